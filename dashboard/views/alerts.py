"""Alerts: incidents firing or resolved in the time range, filtered by run, rule, severity (shown in colour), team
and state, a page of 100 at a time; the active silences, and what was paged as one: flapping runs and rules, storms
over many runs."""

from __future__ import annotations

import math

import pandas as pd
import streamlit as st

from trainwire.dashboard.cells import severity_style, when_text
from trainwire.dashboard.shared import (REFRESH_SECONDS, kept, labels, live, plural, reader, require_runs,
                                        time_range)
from trainwire.dashboard.views.alerts_paging import flapping_section, silences_section, storms_section

STATES = ["firing", "resolved"]
COLUMNS = {"fired_at": "fired", "state": "state", "severity": "severity", "rule": "rule", "run": "run",
           "team": "team", "step": "step", "message": "message", "resolved_at": "resolved"}
SEVERITY_ORDER = ["block", "critical", "warning", "info"]
PAGE = 100  # incidents a page: a styled table of thousands takes seconds to draw


def first_page() -> None:
    """Other filters start again from the newest incidents."""
    st.session_state["alerts-page"] = 1


def multi(label: str, key: str, options: list[str], **kwargs) -> list[str]:
    return st.multiselect(label, options, key=kept(key, [], valid=lambda v: [x for x in v or [] if x in options]),
                          placeholder="all", on_change=first_page, **kwargs)


def body(run_ids: list[str], rules: list[str], severities: list[str], teams: list[str], states: list[str]) -> None:
    span, store = time_range(), reader()
    filters = {"run_ids": run_ids, "rules": rules, "severities": severities, "teams": teams, "states": states,
               "since": span.since, "until": span.until}
    counts = store.alert_incident_counts(**filters)
    pages = max(1, math.ceil(counts["incidents"] / PAGE))
    page = min(max(1, int(st.session_state.get("alerts-page") or 1)), pages)
    incidents = store.alert_incidents(**filters, limit=PAGE, offset=(page - 1) * PAGE)
    cells = st.columns(3)
    cells[0].metric("incidents", counts["incidents"])
    cells[1].metric("firing", counts["firing"])
    cells[2].metric("resolved", counts["incidents"] - counts["firing"])
    if not incidents:
        st.caption(f"no alerts in {span.describe()} match")
    else:
        names = labels()
        frame = pd.DataFrame(incidents)
        frame["run"] = frame["run_id"].map(lambda r: names.get(r, r[:8]))
        frame["fired_at"] = [when_text(i["fired_at"]) for i in incidents]
        frame["resolved_at"] = [when_text(i["resolved_at"]) for i in incidents]  # blank while firing
        first = (page - 1) * PAGE + 1
        st.caption(f"{plural(counts['incidents'], 'incident')} in {span.describe()}, newest first (UTC)"
                   + (f"; showing {first}–{first + len(frame) - 1}" if pages > 1 else ""))
        shown = frame[list(COLUMNS)].rename(columns=COLUMNS)
        st.dataframe(shown.style.map(severity_style, subset=["severity"]), hide_index=True, width="stretch")
        if pages > 1:
            st.session_state["alerts-page"] = page
            left, _ = st.columns([1, 5])
            left.number_input(f"Page (of {pages})", min_value=1, max_value=pages, step=1, key="alerts-page")
    silences_section()
    flapping_section(span, run_ids, rules)
    storms_section(span, rules)


st.title("Alerts")
if require_runs():
    facets = reader().alert_facets()
    names = labels()
    cols = st.columns(5)
    with cols[0]:
        chosen_runs = multi("Run", "alerts-runs", facets["run_ids"], format_func=lambda r: names.get(r, r[:8]))
    with cols[1]:
        chosen_rules = multi("Rule", "alerts-rules", facets["rules"])
    with cols[2]:
        chosen_severities = multi("Severity", "alerts-severities",
                                  sorted(facets["severities"], key=lambda s: (s not in SEVERITY_ORDER,
                                                                              SEVERITY_ORDER.index(s)
                                                                              if s in SEVERITY_ORDER else 0, s)))
    with cols[3]:
        chosen_teams = multi("Team", "alerts-teams", facets["teams"], format_func=lambda t: t or "(no team)")
    with cols[4]:
        chosen_states = multi("State", "alerts-states", STATES)
    live(lambda: body(chosen_runs, chosen_rules, chosen_severities, chosen_teams, chosen_states), every=REFRESH_SECONDS)
