"""One OS user runs the tests yet plays alice, bob and carol (`--actor`): a roles file lets them act for others."""

from __future__ import annotations

import json
import os
import pwd
from pathlib import Path

from trainwire.consumers.governance.registry import ROLES, normalise_actor

OS_USER = normalise_actor(pwd.getpwuid(os.getuid()).pw_name)  # who acts on the CLI, whatever $USER says


def roles_file(path: Path, **roles: list[str]) -> Path:
    """Write a roles file at `path` (e.g. `home / "roles.toml"`): every role open (`*`) unless given, admin to
    nobody, and the test's OS user in `act_for_others`."""
    members = {role: ["*"] for role in sorted(ROLES - {"admin", "act_for_others"})}
    members |= {**roles, "act_for_others": [OS_USER]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{role} = {json.dumps(actors)}\n" for role, actors in members.items()))
    return path
