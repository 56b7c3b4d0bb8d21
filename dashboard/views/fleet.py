"""Fleet, the landing page: every run active in the time range (still running, or heard from in it), the runs that
need a person first and highlighted (dashboard/triage.py): status, quality gates, registry stage, progress, last
event and loss, firing alerts, and whether a silence holds its pages. A running run that has gone quiet is called
out. A page of the table at a time, cut by the store after ranking, so the urgent runs lead page 1 of any fleet; a
search box narrows it. Pick a row to make it the sidebar's run."""

from __future__ import annotations

import math
from datetime import datetime, timezone

import pandas as pd
import streamlit as st

from trainwire.dashboard.cells import number_text
from trainwire.dashboard.shared import (REFRESH_SECONDS, TimeRange, ago, kept, live, plural, reader, require_runs,
                                        runs_listing, time_range)
from trainwire.dashboard.triage import attention
from trainwire.dashboard.views.alerts_paging import active_silences, silence_marks
from trainwire.infra.store.silences import Silence
from trainwire.infra.store.views import ENDED_BADLY, FLEET_PAGE, URGENT_ALERT

QUIET_SECONDS = 60  # a running run silent this long (no step, heartbeat or end) may be stalled
PAGE_SIZES = [25, FLEET_PAGE, 100, 200]
COLUMNS = {"run_name": "run", "attention": "attention", "status": "status", "gates": "gates", "stage": "stage",
           "progress": "progress", "last_step": "last step", "last_event": "last event", "last_loss": "loss",
           "firing_alerts": "firing", "firing_rules": "firing rules", "silenced": "silenced",
           "experiment": "experiment", "team": "team", "host": "host", "run_id": "run id"}
NOT_YET = "–"  # no gate evaluation, no registry transition
# Row backgrounds, light enough for dark text: red for a firing block/critical alert, amber for a run that ended
# badly (failed, stopped, blocked by its gates).
HIGHLIGHT = {URGENT_ALERT: "background-color: #ffd6d6", ENDED_BADLY: "background-color: #ffe8c2"}


def choose(frame: pd.DataFrame) -> None:
    rows = st.session_state["fleet-table"]["selection"]["rows"]
    if rows and (run_id := frame.iloc[rows[0]]["run_id"]) in {r["run_id"] for r in runs_listing()}:
        st.session_state["run"] = run_id
        st.session_state["fleet-chose"] = True


def first_page() -> None:
    """A new search or page size starts again from the most urgent runs."""
    st.session_state["fleet-page"] = 1


def table(runs: list[dict], silences: list[Silence], now: datetime) -> pd.DataFrame:
    stages = {row["run_id"]: row["stage"] for row in reader().registry_stages()}
    frame = pd.DataFrame(runs)
    quiet = frame["quiet"].astype(bool)
    frame["attention"] = [attention(run) for run in runs]
    frame["status"] = frame["status"].where(~quiet, "running (quiet)")
    frame["gates"] = frame["gates"].map(lambda gates: gates if isinstance(gates, str) else NOT_YET)
    frame["stage"] = frame["run_id"].map(lambda run_id: stages.get(run_id, NOT_YET))
    frame["progress"] = (frame["last_step"].fillna(0) / frame["total_steps"]).clip(0, 1).astype(float)
    frame["last_event"] = [ago(t, now) for t in frame["last_event_at"]]
    frame["last_loss"] = [number_text(run["last_loss"]) for run in runs]  # NaN stays NaN, not blank
    frame["firing_rules"] = frame["firing_rules"].apply(lambda rules: ", ".join(rules or []))
    frame["silenced"] = silence_marks(runs, silences)
    return frame


def fleet_page(span: TimeRange, search: str, page_size: int, silences: list[Silence]) -> tuple[dict, int, int]:
    """The page asked for (the last one, when the fleet shrank below it), its number and how many there are."""
    matchers = [(s.run_id, s.experiment, s.host) for s in silences]

    def read(page: int) -> dict:
        return reader().fleet_page(since=span.since, search=search, offset=(page - 1) * page_size, limit=page_size,
                                   quiet_seconds=QUIET_SECONDS, silenced_by=matchers)

    page = max(1, int(st.session_state.get("fleet-page") or 1))
    fleet = read(page)
    pages = max(1, math.ceil(fleet["summary"]["runs"] / page_size))
    if page > pages:
        page = pages
        fleet = read(page)
    return fleet, page, pages


def body(search: str, page_size: int) -> None:
    if st.session_state.pop("fleet-chose", False):
        st.rerun()  # the whole app, so the sidebar shows the chosen run
    span, now = time_range(), datetime.now(timezone.utc)
    silences = [s for s in active_silences() if s.active(now)]
    fleet, page, pages = fleet_page(span, search, page_size, silences)
    summary, runs = fleet["summary"], fleet["runs"]
    matching = f" matching “{search}”" if search else ""
    if not runs:
        st.info(f"No runs active in {span.describe()}{matching}.")
        return
    cells = st.columns(6)
    cells[0].metric("runs", summary["runs"])
    cells[1].metric("running", summary["running"])
    cells[2].metric("quiet", summary["quiet"], help=f"running, nothing heard for more than {QUIET_SECONDS} s")
    cells[3].metric("block/critical", summary["urgent"],
                    help="runs with a firing block or critical alert: on top, in red")
    cells[4].metric("firing alerts", summary["firing_alerts"])
    cells[5].metric("silenced", summary["silenced"], help="runs a silence holds pages of (`trainwire alerts silences`)")
    first = (page - 1) * page_size + 1
    st.caption(f"{plural(summary['runs'], 'run')} active in {span.describe()}{matching}, those needing a person "
               "first: red, a firing block or critical alert; amber, failed, stopped or blocked by its gates. "
               f"Showing {first}–{first + len(runs) - 1}. Pick a row to open it in the other views.")
    frame = table(runs, silences, now)
    highlights = frame["urgency"].map(lambda urgency: HIGHLIGHT.get(urgency, ""))
    shown = frame[list(COLUMNS)].rename(columns=COLUMNS)
    st.dataframe(
        shown.style.apply(lambda row: [highlights[row.name]] * len(row), axis=1), hide_index=True, width="stretch",
        key="fleet-table", on_select=lambda: choose(frame), selection_mode="single-row",
        column_config={"progress": st.column_config.ProgressColumn("progress", min_value=0.0, max_value=1.0),
                       "loss": st.column_config.TextColumn(help="the last logged loss; NaN when it diverged")},
    )
    if pages > 1:
        st.session_state["fleet-page"] = page
        left, _ = st.columns([1, 5])
        left.number_input(f"Page (of {pages})", min_value=1, max_value=pages, step=1, key="fleet-page")


st.title("Fleet")
if require_runs():
    search_box, size_box = st.columns([5, 1])
    searched = search_box.text_input(
        "Search runs", key=kept("fleet-search", ""), on_change=first_page,
        placeholder="name, run id, experiment, team, host, user or status; every word must match")
    size = size_box.selectbox("Runs per page", PAGE_SIZES, on_change=first_page,
                              key=kept("fleet-page-size", FLEET_PAGE,
                                       valid=lambda n: n if n in PAGE_SIZES else FLEET_PAGE))
    live(lambda: body(searched.strip(), size), every=REFRESH_SECONDS)
