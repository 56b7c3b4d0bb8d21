"""Who looked at what and may do what (spec §7, docs/security.md "Dashboard").

The viewer comes from the configured authentication (auth.py); their roles from the roles file, the same one the
CLI's registry commands obey. Every login, every refusal, a session's first view of each page (per run) and every
audit download go to the audit log, the chain that `trainwire audit log` shows and `trainwire audit verify` checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import streamlit as st
from clickhouse_connect.driver.client import Client

from trainwire.consumers.governance import roles_for
from trainwire.infra.config import Settings
from trainwire.infra.store.audit_chain import append_entry

from .auth import Refusal, Viewer, authenticate

VIEWED = "dashboard.viewed"
DOWNLOADED = "dashboard.audit_downloaded"
LOGIN = "dashboard.login"
REFUSED = "dashboard.refused"
# viewer: the views; operator: act on alerts; auditor: the Audit view and its download; approver: registry
# actions (requester and archiver too where the registry asks). The roles file's `admin` holds them all.
DASHBOARD_ROLES = ("viewer", "operator", "auditor", "approver", "requester", "archiver")
_LOGGED = "_trainwire_access_logged"
_ACCESS = "_trainwire_access"


@dataclass(frozen=True)
class Access:
    viewer: Viewer
    roles: frozenset[str]

    @property
    def name(self) -> str:
        return self.viewer.name

    def may(self, role: str) -> bool:
        return role in self.roles


def admit(settings: Settings, store: Client | None) -> Access | Refusal:
    """This session's viewer and roles, or why they may see nothing; logged (once per session) when `store`
    can take audit entries."""
    st.session_state.pop(_ACCESS, None)
    who = authenticate(settings)
    if isinstance(who, Refusal):
        if not who.login and store is not None:
            _log_once(store, (REFUSED, who.reason), who.actor, REFUSED, "", {"reason": who.reason,
                                                                            "claimed": who.claimed})
        return who
    roles = roles_for(settings)
    access = Access(who, frozenset(role for role in DASHBOARD_ROLES if roles.allows(who.name, role)))
    if not access.may("viewer"):
        reason = f"{who.name} does not hold the viewer role in the roles file"
        if store is not None:
            _log_once(store, (REFUSED, reason), who.name, REFUSED, "", {"reason": reason})
        return Refusal(who.name, reason, headline="No access")
    if who.method != "none" and store is not None:
        _log_once(store, (LOGIN, who.name), who.name, LOGIN, "", {"method": who.method, "roles": sorted(access.roles)})
    st.session_state[_ACCESS] = access
    return access


def current() -> Access | None:
    """The access `admit` granted in this session's latest full run (views run after it)."""
    return st.session_state.get(_ACCESS)


def refuse(store: Client, access: Access | None, action: str, run_id: str, reason: str) -> None:
    """Log an action refused to `access` (a call without the role: the button was never shown to them)."""
    append_entry(store, access.name if access else "anonymous", REFUSED, run_id, {"action": action, "reason": reason})


def _log_once(store: Client, key: tuple, actor: str, action: str, run_id: str, details: dict[str, Any]) -> bool:
    logged: set = st.session_state.setdefault(_LOGGED, set())
    if key in logged:
        return False
    append_entry(store, actor, action, run_id, details)
    logged.add(key)
    return True


def log_view(store: Client, page: str, run_id: str | None) -> None:
    """Log this session's view of `page` (showing `run_id`, if the page shows one run) once, not on every refresh."""
    access = current()
    _log_once(store, (page, run_id or ""), access.name if access else "anonymous", VIEWED, run_id or "",
              {"page": page})


def logged_download(store: Client, run_id: str, make: Any) -> Any:
    """A download button's deferred data: `make()`'s result, logged as an audit download when it is fetched.

    Streamlit calls it on click, outside the script's context: the viewer is resolved now, while it can be."""
    access = current()
    actor = access.name if access else "anonymous"

    def fetch() -> Any:
        if access is None or not access.may("auditor"):
            refuse(store, access, DOWNLOADED, run_id, "the audit download needs the auditor role")
            raise PermissionError("the audit download needs the auditor role")
        data = make()
        append_entry(store, actor, DOWNLOADED, run_id, {})
        return data

    return fetch
