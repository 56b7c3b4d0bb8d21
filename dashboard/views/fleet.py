"""Fleet: every run active in the time range (still running, or heard from in it): status, progress, last event,
firing alerts, and whether a silence holds its pages. A running run that has gone quiet is called out. Pick a row to
make it the sidebar's run."""

from __future__ import annotations

from datetime import datetime, timezone

import pandas as pd
import streamlit as st

from trainwire.dashboard.shared import (REFRESH_SECONDS, ago, live, plural, reader, require_runs, runs_listing,
                                        time_range)
from trainwire.dashboard.views.alerts_paging import active_silences, silence_marks

QUIET_SECONDS = 60  # a running run silent this long (no step, heartbeat or end) may be stalled
COLUMNS = {"run_name": "run", "experiment": "experiment", "team": "team", "host": "host", "status": "status",
           "progress": "progress", "last_step": "last step", "last_event": "last event", "last_loss": "loss",
           "firing_alerts": "firing", "firing_rules": "firing rules", "silenced": "silenced", "run_id": "run id"}


def choose(frame: pd.DataFrame) -> None:
    rows = st.session_state["fleet-table"]["selection"]["rows"]
    if rows and (run_id := frame.iloc[rows[0]]["run_id"]) in {r["run_id"] for r in runs_listing()}:
        st.session_state["run"] = run_id
        st.session_state["fleet-chose"] = True


def body() -> None:
    if st.session_state.pop("fleet-chose", False):
        st.rerun()  # the whole app, so the sidebar shows the chosen run
    span, now = time_range(), datetime.now(timezone.utc)
    runs = reader().fleet(since=span.since)
    if not runs:
        st.info(f"No runs active in {span.describe()}.")
        return
    frame = pd.DataFrame(runs)
    seen = pd.to_datetime(frame["last_event_at"], utc=True)
    quiet = (frame["status"] == "running") & ((now - seen).dt.total_seconds() > QUIET_SECONDS)
    frame["status"] = frame["status"].where(~quiet, "running (quiet)")
    frame["progress"] = (frame["last_step"].fillna(0) / frame["total_steps"]).clip(0, 1).astype(float)
    frame["last_event"] = [ago(t, now) for t in frame["last_event_at"]]
    frame["firing_rules"] = frame["firing_rules"].apply(lambda rules: ", ".join(rules or []))
    frame["silenced"] = silence_marks(runs, active_silences())

    running = int((frame["status"] == "running").sum())
    cells = st.columns(5)
    cells[0].metric("runs", len(frame))
    cells[1].metric("running", running)
    cells[2].metric("quiet", int(quiet.sum()), help=f"running, nothing heard for more than {QUIET_SECONDS} s")
    cells[3].metric("firing alerts", int(frame["firing_alerts"].sum()))
    cells[4].metric("silenced", int((frame["silenced"] != "").sum()),
                    help="runs a silence holds pages of (`trainwire alerts silences`)")
    st.caption(f"{plural(len(frame), 'run')} active in {span.describe()}; pick a row to open it in the other views")
    st.dataframe(
        frame[list(COLUMNS)].rename(columns=COLUMNS), hide_index=True, width="stretch", key="fleet-table",
        on_select=lambda: choose(frame), selection_mode="single-row",
        column_config={"progress": st.column_config.ProgressColumn("progress", min_value=0.0, max_value=1.0),
                       "loss": st.column_config.NumberColumn(format="%.4f")},
    )


st.title("Fleet")
if require_runs():
    live(body, every=REFRESH_SECONDS)
