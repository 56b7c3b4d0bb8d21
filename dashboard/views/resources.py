"""Resources: GPU utilisation, memory, temperature and power per host and GPU, and training throughput, for the
sidebar's run or for everything on one host; the GPU rules' configured thresholds drawn and labelled."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from trainwire.dashboard.charts import time_lines
from trainwire.dashboard.shared import (REFRESH_SECONDS, kept, labels, live, reader, require_run, runs_listing,
                                        time_range)
from trainwire.dashboard.thresholds import gpu_thresholds

MAX_POINTS = 300
SCOPES = ["run", "host"]


def body(run_id: str | None, host: str | None) -> None:
    store, span = reader(), time_range()
    experiment = next((r["experiment"] for r in runs_listing() if r["run_id"] == run_id), None)
    limits = gpu_thresholds(experiment)
    gpus = pd.DataFrame(store.gpu_series(run_id=run_id, host=host, since=span.since, until=span.until,
                                         max_points=MAX_POINTS))
    if gpus.empty:
        st.caption(f"no GPU samples in {span.describe()}")
    else:
        gpus["gpu"] = gpus["host"] + " · GPU " + gpus["gpu_index"].astype(str)
        gpus["memory_used_gb"] = gpus["memory_used_mb"] / 1024
        latest = gpus.sort_values("t").groupby("gpu").tail(1)
        cells = st.columns(4)
        cells[0].metric("GPUs", latest["gpu"].nunique())
        cells[1].metric("mean utilisation", f"{latest['utilization_pct'].mean():.0f} %")
        cells[2].metric("hottest", f"{latest['temperature_c'].max():.0f} °C")
        cells[3].metric("power", f"{latest['power_w'].sum():.0f} W")
        charts = [
            ("gpu-utilization", time_lines(gpus, "utilization_pct", "utilisation %", "gpu",
                                           threshold=limits.get("utilization_pct"))),
            ("gpu-memory", time_lines(gpus, "memory_used_gb", "memory used GB", "gpu")),
            ("gpu-temperature", time_lines(gpus, "temperature_c", "temperature °C", "gpu",
                                           threshold=limits.get("temperature_c"))),
            ("gpu-power", time_lines(gpus, "power_w", "power W", "gpu")),
        ]
        for column, (name, chart) in zip(st.columns(2) + st.columns(2), charts):
            with column.container(key=f"chart-{name}"):
                st.altair_chart(chart, width="stretch")
    st.subheader("Throughput")
    speed = pd.DataFrame(store.throughput(run_id=run_id, host=host, since=span.since, until=span.until,
                                          max_points=MAX_POINTS))
    if speed.empty:
        st.caption(f"no steps logged in {span.describe()}")
        return
    names = labels()
    speed["run"] = speed["run_id"].map(lambda r: names.get(r, r[:8]))
    with st.container(key="chart-throughput"):
        st.altair_chart(time_lines(speed, "tokens_per_s", "tokens/s", "run"), width="stretch")


st.title("Resources")
hosts = sorted({r["host"] for r in runs_listing() if r["host"]})
scope = st.segmented_control("Show", SCOPES, format_func={"run": "the sidebar's run", "host": "a host"}.__getitem__,
                             key=kept("resources-scope", "run", valid=lambda s: s if s in SCOPES else "run"))
if scope == "host":
    first_host = hosts[0] if hosts else None
    chosen_host = st.selectbox("Host", hosts, key=kept("resources-host", first_host,
                                                       valid=lambda h: h if h in hosts else first_host))
    if chosen_host is None:
        st.info("No hosts yet.")
    else:
        live(lambda: body(None, chosen_host), every=REFRESH_SECONDS)
elif (chosen := require_run()) is not None:
    live(lambda: body(chosen, None), every=REFRESH_SECONDS)
