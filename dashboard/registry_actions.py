"""The registry actions on the Audit view, for the approver role: request Staging, approve Production, archive.

Each goes through the governance service with the viewer as actor, as the CLI's do, so the roles file, the
four-eyes rule and the audit log apply. The buttons show only to approvers; a call without the role (a forged
widget message) is refused and logged here, before governance is asked.
"""

from __future__ import annotations

from typing import Any

import streamlit as st

from trainwire.consumers.governance import Governance, RegistryError, roles_for

from .access import Access, current, refuse
from .shared import client, settings

# action → (button label, stage it applies to, registry role it needs besides approver)
ACTIONS = {
    "request": ("Request Staging", {"Candidate"}, "requester"),
    "approve": ("Approve for Production", {"Staging"}, None),
    "archive": ("Archive", {"None", "Candidate", "Staging", "Production"}, "archiver"),
}
_RESULT = "_trainwire_registry_result"


def offered(access: Access | None, stage: str) -> list[str]:
    """The actions this viewer is shown for a run in `stage`."""
    if access is None or not access.may("approver"):
        return []
    return [name for name, (_, stages, role) in ACTIONS.items() if stage in stages and (role is None or access.may(role))]


def act(access: Access | None, action: str, run_id: str, reason: str) -> dict[str, Any]:
    """Run one registry action as the viewer; PermissionError (logged) without the approver role, RegistryError
    (logged by governance) when the registry refuses."""
    store = client()
    if access is None or not access.may("approver"):
        refuse(store, access, f"registry.{action}", run_id, "registry actions need the approver role")
        raise PermissionError(f"registry {action}: {access.name if access else 'anonymous'} does not hold the "
                              "approver role")
    governance = Governance(store, roles_for(settings()))
    return getattr(governance, f"registry_{action}")(run_id=run_id, actor=access.name, reason=reason or None)


def _run(action: str, run_id: str) -> None:
    reason = st.session_state.get(f"registry-reason-{action}", "")
    try:
        result = act(current(), action, run_id, reason)
        st.session_state[_RESULT] = ("success", f"run {run_id}: {result['from']} → {result['stage']} by "
                                                f"{result['actor']}")
    except (PermissionError, RegistryError, ValueError) as err:
        st.session_state[_RESULT] = ("error", str(err))


def show_registry_actions(run_id: str, stage: str) -> None:
    if (outcome := st.session_state.pop(_RESULT, None)) is not None:
        (st.success if outcome[0] == "success" else st.error)(outcome[1])
    actions = offered(current(), stage)
    if not actions:
        return
    st.subheader("Registry actions")
    for action, column in zip(actions, st.columns(len(actions))):
        label, _, _ = ACTIONS[action]
        with column:
            st.text_input("Reason" + (" (required)" if action == "archive" else ""), key=f"registry-reason-{action}")
            st.button(label, key=f"registry-{action}", on_click=_run, args=(action, run_id),
                      type="primary" if action == "approve" else "secondary")
