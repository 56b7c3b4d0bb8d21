"""The trainwire dashboard: pick a run in the sidebar; its status, curves and alerts refresh every 2 s.

Served by `trainwire dashboard` and `trainwire demo` (see serve.py), which put the store DSN in TRAINWIRE_STORE.
Every row comes through the read API, `StoreReader`.
"""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st
from clickhouse_connect.driver.client import Client

from trainwire.infra.config import ConfigError, load_settings
from trainwire.infra.store import connect_store
from trainwire.infra.store.read import Row, StoreReader

REFRESH_SECONDS = 2
CURVES = [("steps", "loss", "loss"), ("evals", "eval_loss", "eval loss"),
          ("steps", "learning_rate", "learning rate"), ("steps", "grad_norm", "grad norm")]
ALERT_COLUMNS = ["rule", "severity", "state", "step", "message"]


@st.cache_resource(show_spinner=False, on_release=lambda client: client.close())
def store_client(dsn: str) -> Client:
    return connect_store(dsn)


def reader() -> StoreReader:
    return StoreReader(store_client(load_settings().store_dsn))


def fetch_runs(store: StoreReader) -> list[Row]:
    return store.runs() if store.migrated() else []


def run_label(run: Row) -> str:
    return f"{run['run_name']} · {run['status']} · {run['run_id'][:8]}"


def status_line(run: Row) -> str:
    firing = run["firing_alerts"] or 0
    return (f"**{run['status']}** · last step {run['last_step'] or 0} of {run['total_steps']} · "
            f"{firing} firing alert{'' if firing == 1 else 's'}")


def listing(runs: list[Row]) -> tuple[tuple[str, str], ...]:
    """What the run picker shows; when it changes, the whole page reruns to redraw the picker."""
    return tuple((run["run_id"], run["status"]) for run in runs)


def pick_run(runs: list[Row]) -> str | None:
    labels = {run["run_id"]: run_label(run) for run in runs}
    return st.sidebar.selectbox("Run", list(labels), format_func=labels.__getitem__, key="run",
                                placeholder="no runs yet")


def curve(frame: pd.DataFrame, field: str, label: str, last_step: int, alert_steps: list[int]) -> alt.LayerChart:
    """One metric over steps 0..last_step, with a dashed red rule at each step an alert fired on."""
    line = alt.Chart(frame).mark_line(point=len(frame) < 30).encode(
        x=alt.X("step:Q", title="step", scale=alt.Scale(domain=[0, last_step])),
        y=alt.Y(f"{field}:Q", title=label, scale=alt.Scale(zero=False)),
        tooltip=["step", field],
    )
    rules = alt.Chart(pd.DataFrame({"step": alert_steps}, dtype="int64")).mark_rule(
        color="#d62728", strokeDash=[4, 3]).encode(x="step:Q")
    return (line + rules).properties(height=240)


def show_curves(run: Row, steps: list[Row], evals: list[Row], alert_steps: list[int]) -> None:
    if not steps:
        st.caption("no steps logged yet")
        return
    last_step = max(run["total_steps"] or 0, steps[-1]["step"])
    frames = {"steps": pd.DataFrame(steps), "evals": pd.DataFrame(evals, columns=["step", "eval_loss"])}
    for column, (source, field, label) in zip(st.columns(2) + st.columns(2), CURVES):
        with column:
            st.altair_chart(curve(frames[source], field, label, last_step, alert_steps), width="stretch")


def show_alerts(incidents: list[Row]) -> None:
    st.subheader("Alerts")
    if incidents:
        st.dataframe(pd.DataFrame(incidents)[ALERT_COLUMNS], hide_index=True)
    else:
        st.caption("no alerts")


@st.fragment(run_every=REFRESH_SECONDS)
def live(run_id: str | None, shown: tuple[tuple[str, str], ...]) -> None:
    store = reader()
    runs = fetch_runs(store)
    if listing(runs) != shown:
        st.rerun()
    run = next((r for r in runs if r["run_id"] == run_id), None)
    if run is None:
        st.info("No runs yet. Start one with `trainwire demo` or `trainwire.init()`; this page updates on its own.")
        return
    st.markdown(status_line(run))
    st.caption(f"{run['experiment']} · {run['run_name']} · {run['run_id']} · host {run['host']}")
    incidents = store.incidents([run_id])
    show_curves(run, store.steps(run_id), store.evals(run_id), sorted({i["step"] for i in incidents}))
    show_alerts(incidents)


def main() -> None:
    st.set_page_config(page_title="trainwire", layout="wide")
    st.title("trainwire")
    try:
        runs = fetch_runs(reader())
    except ConfigError as err:
        st.error(str(err))
        return
    live(pick_run(runs), listing(runs))


main()
