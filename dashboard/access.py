"""Who looked at what (spec §7): a session's first view of each page, per run, and every audit download go to
the audit log, the same hash chain that `trainwire audit log` shows and `trainwire audit verify` checks.

The viewer is the user Streamlit's own login names, else the one an authenticating reverse proxy passes in a
header, else `anonymous@<address>`. Like the CLI's `--actor`, a header is asserted, not proven: serve the dashboard
only behind a proxy that sets it (and strips it from what clients send) when the names must hold.
"""

from __future__ import annotations

from typing import Any

import streamlit as st
from clickhouse_connect.driver.client import Client

from trainwire.infra.store.audit_chain import append_entry

PROXY_USER_HEADERS = ("X-Forwarded-User", "X-Auth-Request-User", "X-Forwarded-Email", "X-Auth-Request-Email",
                      "Remote-User")
VIEWED = "dashboard.viewed"
DOWNLOADED = "dashboard.audit_downloaded"
_LOGGED = "_trainwire_access_logged"


def viewer() -> str:
    try:
        if st.user.is_logged_in:
            return str(st.user.get("email") or st.user.get("name") or st.user.get("sub"))
    except Exception:  # no login configured (or an older Streamlit): fall through to the proxy's header
        pass
    headers = st.context.headers or {}
    for name in PROXY_USER_HEADERS:
        value = headers.get(name)
        if isinstance(value, str) and value.strip():
            return value.strip()
    address = st.context.ip_address
    return f"anonymous@{address}" if isinstance(address, str) and address else "anonymous"


def log_view(client: Client, page: str, run_id: str | None) -> None:
    """Log this session's view of `page` (showing `run_id`, if the page shows one run) once, not on every refresh."""
    logged: set = st.session_state.setdefault(_LOGGED, set())
    key = (page, run_id or "")
    if key in logged:
        return
    append_entry(client, viewer(), VIEWED, run_id or "", {"page": page})
    logged.add(key)


def logged_download(client: Client, run_id: str, make: Any) -> Any:
    """A download button's deferred data: `make()`'s result, logged as an audit download when it is fetched.

    Streamlit calls it on click, outside the script's context: the viewer is resolved now, while it can be."""
    actor = viewer()

    def fetch() -> Any:
        data = make()
        append_entry(client, actor, DOWNLOADED, run_id, {})
        return data

    return fetch
