"""Experiment comparison: the chosen runs' curves overlaid, and how their hyperparameters and seeds differ; a run
whose loss went NaN is marked."""

from __future__ import annotations

import json
import math

import pandas as pd
import streamlit as st

from trainwire.dashboard.charts import overlay
from trainwire.dashboard.shared import (REFRESH_SECONDS, kept, labels, live, reader, runs_listing, selected_run,
                                        time_range)

MAX_RUNS = 8
MAX_POINTS = 300
NAN_MARK = "⚠ NaN loss"
METRICS = {"loss": "loss", "learning_rate": "learning rate", "grad_norm": "grad norm", "tokens_per_s": "tokens/s"}


def default_runs() -> list[str]:
    """The sidebar's run and the newest others of its experiment, up to four."""
    runs = runs_listing()
    chosen = selected_run()
    experiment = next((r["experiment"] for r in runs if r["run_id"] == chosen), None)
    same = [r["run_id"] for r in runs if r["experiment"] == experiment and r["run_id"] != chosen]
    return ([chosen] if chosen else []) + same[:3]


def on_nan(run: dict) -> bool:
    """Whether the run's last logged loss is NaN or ±Inf: it diverged, and its curve stops where that began."""
    loss = run.get("last_loss")
    return loss is not None and not math.isfinite(loss)


def run_names(runs: list[dict]) -> dict[str, str]:
    """Each run's name in the legend and the table: the sidebar's label, marked when the run's loss went NaN."""
    names = labels()
    return {r["run_id"]: names.get(r["run_id"], r["run_id"][:8]) + (f" · {NAN_MARK}" if on_nan(r) else "")
            for r in runs}


def parameter_table(runs: list[dict], differing: list[str], only_differing: bool) -> pd.DataFrame:
    names = differing if only_differing else sorted({n for r in runs for n in r["hyperparameters"]})
    columns = run_names(runs)
    shown = {columns[r["run_id"]]: [_cell(r["hyperparameters"], n) for n in names] for r in runs}
    return pd.DataFrame(shown, index=pd.Index(names, name="parameter"))


def _cell(parameters: dict, name: str) -> str:
    if name not in parameters:
        return "—"
    value = parameters[name]
    return value if isinstance(value, str) else json.dumps(value)


def body(run_ids: list[str], metric: str, only_differing: bool) -> None:
    span = time_range()
    result = reader().compare(run_ids, since=span.since, until=span.until, max_points=MAX_POINTS)
    names = run_names(result["runs"])
    for run in filter(on_nan, result["runs"]):
        ended = "ended on" if run["status"] != "running" else "is at"
        st.warning(f"{names[run['run_id']].removesuffix(' · ' + NAN_MARK)} {ended} a NaN loss: its curve stops "
                   "where the loss stopped being finite.", icon=":material/warning:")
    curves = pd.DataFrame(result["curves"])
    if curves.empty:
        st.caption(f"no steps logged in {span.describe()}")
    else:
        curves["run"] = curves["run_id"].map(lambda run_id: names.get(run_id, run_id[:8]))
        with st.container(key="chart-compare"):
            st.altair_chart(overlay(curves, metric, METRICS[metric], "run"), width="stretch")
    st.subheader("Hyperparameters and seeds")
    differing = result["differing"]
    st.caption(f"{len(differing)} of {len({n for r in result['runs'] for n in r['hyperparameters']})} "
               "parameters differ" + (f": {', '.join(differing)}" if differing else ""))
    table = parameter_table(result["runs"], differing, only_differing)
    if table.empty:
        st.caption("nothing to show")
    else:
        st.dataframe(table, width="stretch")


st.title("Experiment comparison")
listed = {r["run_id"] for r in runs_listing()}
picked = st.multiselect(
    "Runs", list(labels()), format_func=labels().__getitem__, max_selections=MAX_RUNS,
    key=kept("compare-runs", default_runs(), valid=lambda ids: [i for i in ids or [] if i in listed]),
)
left, right = st.columns([3, 1])
with left:
    chosen_metric = st.segmented_control("Metric", list(METRICS), format_func=METRICS.__getitem__,
                                         key=kept("compare-metric", "loss", valid=lambda m: m if m in METRICS
                                                  else "loss"))
with right:
    differing_only = st.toggle("only differing hyperparameters", key=kept("compare-differing", True))
if not picked:
    st.info("Pick runs to compare.")
else:
    live(lambda: body(picked, chosen_metric or "loss", differing_only), every=REFRESH_SECONDS)
