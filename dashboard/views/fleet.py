"""Fleet, the landing page: every run active in the time range (still running, or heard from in it), the runs that
need a person first and highlighted (dashboard/triage.py): status, quality gates, registry stage, progress, last
event and loss, firing alerts, and whether a silence holds its pages. A running run that has gone quiet is called
out. Pick a row to make it the sidebar's run."""

from __future__ import annotations

from datetime import datetime, timezone

import pandas as pd
import streamlit as st

from trainwire.dashboard.cells import number_text
from trainwire.dashboard.shared import (REFRESH_SECONDS, ago, live, plural, reader, require_runs, runs_listing,
                                        time_range)
from trainwire.dashboard.triage import ALERTING, ENDED_BADLY_RANK, attention, by_urgency, rank
from trainwire.dashboard.views.alerts_paging import active_silences, silence_marks

QUIET_SECONDS = 60  # a running run silent this long (no step, heartbeat or end) may be stalled
COLUMNS = {"run_name": "run", "attention": "attention", "status": "status", "gates": "gates", "stage": "stage",
           "progress": "progress", "last_step": "last step", "last_event": "last event", "last_loss": "loss",
           "firing_alerts": "firing", "firing_rules": "firing rules", "silenced": "silenced",
           "experiment": "experiment", "team": "team", "host": "host", "run_id": "run id"}
NOT_YET = "–"  # no gate evaluation, no registry transition
# Row backgrounds, light enough for dark text: red for a firing block/critical alert, amber for a run that ended
# badly (failed, stopped, blocked by its gates).
HIGHLIGHT = {ALERTING: "background-color: #ffd6d6", ENDED_BADLY_RANK: "background-color: #ffe8c2"}


def choose(frame: pd.DataFrame) -> None:
    rows = st.session_state["fleet-table"]["selection"]["rows"]
    if rows and (run_id := frame.iloc[rows[0]]["run_id"]) in {r["run_id"] for r in runs_listing()}:
        st.session_state["run"] = run_id
        st.session_state["fleet-chose"] = True


def table(runs: list[dict], now: datetime) -> pd.DataFrame:
    stages = {row["run_id"]: row["stage"] for row in reader().registry_stages()}
    frame = pd.DataFrame(runs)
    seen = pd.to_datetime(frame["last_event_at"], utc=True)
    quiet = (frame["status"] == "running") & ((now - seen).dt.total_seconds() > QUIET_SECONDS)
    frame["quiet"] = quiet
    frame["rank"] = [rank(run) for run in runs]
    frame["attention"] = [attention(run) for run in runs]
    frame["status"] = frame["status"].where(~quiet, "running (quiet)")
    frame["gates"] = frame["gates"].map(lambda gates: gates if isinstance(gates, str) else NOT_YET)
    frame["stage"] = frame["run_id"].map(lambda run_id: stages.get(run_id, NOT_YET))
    frame["progress"] = (frame["last_step"].fillna(0) / frame["total_steps"]).clip(0, 1).astype(float)
    frame["last_event"] = [ago(t, now) for t in frame["last_event_at"]]
    frame["last_loss"] = [number_text(run["last_loss"]) for run in runs]  # NaN stays NaN, not blank
    frame["firing_rules"] = frame["firing_rules"].apply(lambda rules: ", ".join(rules or []))
    frame["silenced"] = silence_marks(runs, active_silences())
    return frame


def body() -> None:
    if st.session_state.pop("fleet-chose", False):
        st.rerun()  # the whole app, so the sidebar shows the chosen run
    span, now = time_range(), datetime.now(timezone.utc)
    runs = by_urgency(reader().fleet(since=span.since))
    if not runs:
        st.info(f"No runs active in {span.describe()}.")
        return
    frame = table(runs, now)
    cells = st.columns(6)
    cells[0].metric("runs", len(frame))
    cells[1].metric("running", int((frame["status"] == "running").sum()))
    cells[2].metric("quiet", int(frame["quiet"].sum()), help=f"running, nothing heard for more than {QUIET_SECONDS} s")
    cells[3].metric("block/critical", int((frame["rank"] == ALERTING).sum()),
                    help="runs with a firing block or critical alert: on top, in red")
    cells[4].metric("firing alerts", int(frame["firing_alerts"].sum()))
    cells[5].metric("silenced", int((frame["silenced"] != "").sum()),
                    help="runs a silence holds pages of (`trainwire alerts silences`)")
    st.caption(f"{plural(len(frame), 'run')} active in {span.describe()}, those needing a person first: red, a "
               "firing block or critical alert; amber, failed, stopped or blocked by its gates. Pick a row to open "
               "it in the other views.")
    highlights = frame["rank"].map(lambda r: HIGHLIGHT.get(r, ""))
    shown = frame[list(COLUMNS)].rename(columns=COLUMNS)
    st.dataframe(
        shown.style.apply(lambda row: [highlights[row.name]] * len(row), axis=1), hide_index=True, width="stretch",
        key="fleet-table", on_select=lambda: choose(frame), selection_mode="single-row",
        column_config={"progress": st.column_config.ProgressColumn("progress", min_value=0.0, max_value=1.0),
                       "loss": st.column_config.TextColumn(help="the last logged loss; NaN when it diverged")},
    )


st.title("Fleet")
if require_runs():
    live(body, every=REFRESH_SECONDS)
