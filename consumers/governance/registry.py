"""The model registry's stages and rules (spec §6), pure: the store keeps transitions in the audit log.

    None ──(all gates passed, automatic)──► Candidate ──request──► Staging ──approve──► Production
      └──────────────── archive (any stage, with a reason) ──────────────────────────────► Archived

Approval needs an approver other than the requester, G6 passed and a verified audit trail. Actors are compared
normalised (`normalise_actor`), so `Alice`, `alice ` and a full-width `ａｌｉｃｅ` are one person. Roles (who may
view, operate, request, approve, archive, audit, act for others) come from a TOML file; without one every actor holds
every role but `act_for_others`.
"""

from __future__ import annotations

import tomllib
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Stage = Literal["None", "Candidate", "Staging", "Production", "Archived"]
STAGES: tuple[Stage, ...] = ("None", "Candidate", "Staging", "Production", "Archived")
ALLOWED: dict[str, frozenset[str]] = {
    "None": frozenset({"Candidate", "Archived"}),
    "Candidate": frozenset({"Staging", "Archived"}),
    "Staging": frozenset({"Production", "Archived"}),
    "Production": frozenset({"Archived"}),
    "Archived": frozenset(),
}
ROLE_FOR_STAGE = {"Staging": "requester", "Production": "approver", "Archived": "archiver"}
ROLES = frozenset({"viewer", "operator", "approver", "auditor", "admin", "requester", "archiver", "act_for_others"})
ADMIN, ACT_FOR_OTHERS = "admin", "act_for_others"
SYSTEM_ACTOR = "trainwire"  # who promotes a run to Candidate when its gates pass


def normalise_actor(name: str) -> str:
    """The actor as compared and recorded: NFKC (full-width and compatibility forms), case-folded, invisible
    format characters (zero-width space, soft hyphen) dropped, trimmed. Empty, or holding a control character
    (a newline could forge a line of the log as printed), is refused with a ValueError."""
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", str(name)).casefold())
    actor = "".join(c for c in folded if unicodedata.category(c) != "Cf").strip()
    if not actor:
        raise ValueError(f"actor {name!r}: empty once trimmed")
    if any(unicodedata.category(c) == "Cc" for c in actor):
        raise ValueError(f"actor {name!r}: holds a control character")
    return actor


class RegistryError(ValueError):
    """A refused transition; the message names the run, the stages and the reason."""


@dataclass(frozen=True)
class Roles:
    """Role → normalised actors holding it; `*` is anyone, and `admin` holds every role. `None` (no roles file):
    anyone holds every role except `act_for_others`, which nobody holds. A file without `viewer` lets anyone view."""

    members: dict[str, frozenset[str]] | None = None

    def allows(self, actor: str, role: str) -> bool:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r} (known: {', '.join(sorted(ROLES))})")
        if self.members is None:
            return role != ACT_FOR_OTHERS
        try:
            actor = normalise_actor(actor)
        except ValueError:
            return False
        return any("*" in held or actor in held
                   for held in (self.members.get(role, frozenset()), self.members.get(ADMIN, frozenset())))

    def may_act_for(self, os_user: str, actor: str) -> bool:
        """Whether the OS user `os_user` may record `actor` as the one acting (`--actor`): themself always."""
        try:
            same = normalise_actor(os_user) == normalise_actor(actor)
        except ValueError:
            return False
        return same or self.allows(os_user, ACT_FOR_OTHERS)

    @classmethod
    def load(cls, path: Path | None) -> Roles:
        """Roles from a TOML file such as `approver = ["carol"]`; a missing file (or None) means open roles."""
        if path is None or not path.is_file():
            return cls()
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ValueError(f"roles file {path}: {err}") from None
        unknown = sorted(set(data) - ROLES)
        if unknown:
            raise ValueError(f"roles file {path}: unknown role key {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(ROLES))})")
        members = {}
        for role, actors in data.items():
            if not (isinstance(actors, list) and all(isinstance(a, str) for a in actors)):
                raise ValueError(f"roles file {path}: {role} must be a list of actor names, got {actors!r}")
            try:
                members[role] = frozenset(a if a == "*" else normalise_actor(a) for a in actors)
            except ValueError as err:
                raise ValueError(f"roles file {path}: {role}: {err}") from None
        # Seeing the dashboard was never restricted: a roles file written for the registry alone keeps it open.
        members.setdefault("viewer", frozenset({"*"}))
        return cls(members)


@dataclass(frozen=True)
class Transition:
    run_id: str
    from_stage: str
    to_stage: str
    actor: str
    reason: str = ""


@dataclass(frozen=True)
class ApprovalEvidence:
    """What approval to Production rests on, gathered from the store at the time of the request."""

    requester: str | None = None  # who moved the run to Staging
    g6_passed: bool = False
    g6_message: str = ""
    trail_verified: bool = False
    trail_problems: list[str] = field(default_factory=list)


def check_transition(transition: Transition, roles: Roles, approval: ApprovalEvidence | None = None) -> None:
    """Raise `RegistryError` unless the transition is allowed; return None when it is."""
    t = transition
    before = "no stage" if t.from_stage == "None" else t.from_stage  # the registry's "None" is no stage yet
    prefix = f"run {t.run_id}: {before} → {t.to_stage} refused"
    if t.to_stage not in STAGES:
        raise RegistryError(f"{prefix}: unknown stage (stages: {', '.join(STAGES)})")
    if t.to_stage not in ALLOWED[t.from_stage]:
        allowed = ", ".join(sorted(ALLOWED[t.from_stage])) or "none: Archived is final"
        raise RegistryError(f"{prefix}: not an allowed transition (from {before}: {allowed})")
    try:
        actor = normalise_actor(t.actor)
    except ValueError:
        raise RegistryError(f"{prefix}: no actor") from None
    if t.to_stage == "Candidate" and actor != SYSTEM_ACTOR:
        raise RegistryError(f"{prefix}: Candidate is set by trainwire when all gates pass")
    role = ROLE_FOR_STAGE.get(t.to_stage)
    if role and not roles.allows(actor, role):
        raise RegistryError(f"{prefix}: {actor} does not hold the {role} role")
    if t.to_stage == "Archived" and not t.reason.strip():
        raise RegistryError(f"{prefix}: archiving needs a reason")
    if t.to_stage == "Production":
        approval = approval or ApprovalEvidence()
        if approval.requester is None or _same_actor(approval.requester, actor):
            raise RegistryError(f"{prefix}: the approver must be someone other than the requester "
                                f"({approval.requester})")
        if not approval.g6_passed:
            raise RegistryError(f"{prefix}: G6 audit completeness has not passed ({approval.g6_message})")
        if not approval.trail_verified:
            raise RegistryError(f"{prefix}: the audit trail does not verify: {'; '.join(approval.trail_problems)}")


def _same_actor(recorded: str, actor: str) -> bool:
    """A requester recorded before actors were normalised is compared normalised too; one that no longer
    normalises (empty) cannot be told apart from anyone, so it counts as the same."""
    try:
        return normalise_actor(recorded) == actor
    except ValueError:
        return True


def current_stage(transitions: list[Transition]) -> str:
    return transitions[-1].to_stage if transitions else "None"
