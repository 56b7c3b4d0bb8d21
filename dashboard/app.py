"""The trainwire dashboard: six views of the store, live and over any past time range; it opens on the Fleet.

Served by `trainwire dashboard`, `trainwire up` and `trainwire demo` (see serve.py), which put the store DSN in
TRAINWIRE_STORE. Every row comes through the read API, `StoreReader`. This entry script draws what all views
share (the sidebar's run and time range, kept across pages and in the URL) and runs the chosen view.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import streamlit as st

from trainwire.dashboard.access import Access, admit, log_view
from trainwire.dashboard.auth import Refusal
from trainwire.dashboard.shared import (DEFAULT_RANGE, RANGE_LABELS, RANGES, client, from_url, kept, labels, reader,
                                        settings, time_range, to_url)
from trainwire.dashboard.triage import most_urgent
from trainwire.infra.config import ConfigError
from trainwire.infra.store.read import StoreReader

VIEWS = [  # what the viewer role sees; the Fleet, the ops landing page, first
    st.Page("views/fleet.py", title="Fleet", icon=":material/dns:", default=True),
    st.Page("views/training.py", title="Training", icon=":material/show_chart:"),
    st.Page("views/compare.py", title="Experiment comparison", icon=":material/compare_arrows:"),
    st.Page("views/resources.py", title="Resources", icon=":material/memory:"),
    st.Page("views/alerts.py", title="Alerts", icon=":material/notifications:"),
]
AUDIT_VIEW = st.Page("views/audit.py", title="Audit", icon=":material/verified:")  # auditors' and approvers'
ONE_RUN_VIEWS = {"Training", "Resources", "Audit"}  # the views that show the sidebar's run
WATCH_SECONDS = 2.0


def read_listing(store: StoreReader, digest: tuple) -> list:
    """The runs the sidebar offers, read again only when `digest` (runs_digest) says the listing changed: at 10,000
    runs a read costs a tenth of a second or more, and every rerun of every page needs the listing."""
    if st.session_state.get("runs_listing_digest") != digest:
        st.session_state["runs_listing"] = store.runs() if digest else []
        st.session_state["runs_listing_digest"] = digest
    return st.session_state["runs_listing"]


def pick_run(store: StoreReader, digest: tuple) -> None:
    """The sidebar's run: the URL's, else the one chosen before, else the most urgent (dashboard/triage.py)."""
    runs = read_listing(store, digest)
    ids = [run["run_id"] for run in runs]

    def chosen_or_most_urgent(run_id: str | None) -> str | None:
        if not ids:
            return None
        if run_id in ids:
            return run_id
        urgent = most_urgent(store)
        return urgent if urgent in ids else ids[0]

    kept("run", None, valid=chosen_or_most_urgent, resend=True)
    names = labels()
    st.sidebar.selectbox("Run", ids, format_func=names.__getitem__, key="run", placeholder="no runs yet")


def pick_time_range() -> None:
    kept("range", DEFAULT_RANGE, valid=lambda label: label if label in RANGES else DEFAULT_RANGE, resend=True)
    st.sidebar.segmented_control("Time range", list(RANGES), format_func=RANGE_LABELS.__getitem__, key="range",
                                 help="the last 15 min … 7 d follow live data; a custom range is history")
    if st.session_state["range"] == "custom":
        now = datetime.now(timezone.utc).replace(second=0, microsecond=0, tzinfo=None)
        kept("range_from", now - timedelta(hours=1))
        kept("range_to", now)
        st.sidebar.datetime_input("From (UTC)", key="range_from")
        st.sidebar.datetime_input("To (UTC)", key="range_to")
    st.sidebar.caption(f"showing {time_range().describe()}")


@st.fragment(run_every=WATCH_SECONDS)
def watch_runs(store: StoreReader, shown: tuple) -> None:
    """Redraw everything (the run picker first) when a run starts or ends; views refresh their own data."""
    if store.migrated() and tuple(store.runs_digest().values()) != shown:
        st.rerun()


def views_for(access: Access) -> list:
    return VIEWS + ([AUDIT_VIEW] if access.may("auditor") or access.may("approver") else [])


def show_refusal(refusal: Refusal) -> None:
    """All a refused session sees: nothing from the store."""
    if refusal.login:
        st.title("trainwire")
        st.info("Log in to see the dashboard.")
        st.button("Log in", on_click=st.login, type="primary")
        return
    st.title(refusal.headline)
    st.error(f"The dashboard shows nothing to this request: {refusal.reason}.")
    if settings().dashboard_auth == "oidc" and st.user.get("is_logged_in"):  # a login without the viewer role
        st.button("Log out", on_click=st.logout)


def show_viewer(access: Access) -> None:
    roles = ", ".join(sorted(access.roles))
    st.sidebar.caption(f"{access.name} · {roles}")
    if access.viewer.method == "oidc":
        st.sidebar.button("Log out", on_click=st.logout)


def main() -> None:
    # A link's run and range are taken before anything else: a click in the page that interrupts this first run
    # (a page switch drops the URL's parameters) must not lose them.
    from_url("run")
    from_url("range")
    st.set_page_config(page_title="trainwire", layout="wide")
    try:
        store = reader()
        access = admit(settings(), client() if store.migrated() else None)  # an empty store takes no entries
    except (ConfigError, ValueError) as err:  # settings, or the roles file
        st.error(str(err))
        return
    if isinstance(access, Refusal):
        show_refusal(access)
        return
    page = st.navigation(views_for(access))
    st.sidebar.markdown("## trainwire")
    show_viewer(access)
    digest = tuple(store.runs_digest().values()) if store.migrated() else ()
    pick_run(store, digest)
    pick_time_range()
    to_url(run=st.session_state.get("run"), range=st.session_state.get("range"))
    with st.sidebar:
        watch_runs(store, digest)
    if digest:  # an empty store has shown nothing to log
        log_view(client(), page.title, st.session_state.get("run") if page.title in ONE_RUN_VIEWS else None)
    page.run()


main()
