"""Training: one run's loss, learning rate, grad norm and throughput over steps, its progress, ETA and gate outcome,
alerts marked on the curves. Opens on the most urgent run (dashboard/triage.py); refreshes every second while the
time range is live."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from trainwire.dashboard.charts import metric_curve
from trainwire.dashboard.cells import severity_style, when_text
from trainwire.dashboard.shared import duration, live, plural, reader, require_run, time_range

MAX_POINTS = 500
ALERT_COLUMNS = ["fired_at", "state", "severity", "rule", "step", "message"]


def status_line(run: dict) -> str:
    pace = f" · {run['steps_per_s']:.1f} steps/s" if run["status"] == "running" and run.get("steps_per_s") else ""
    eta = f" · ETA {duration(run['eta_s'])}" if run.get("eta_s") is not None else ""
    gates = f" · gates **{run['gates']}**" if run.get("gates") else ""
    return (f"**{run['status']}** · last step {run['last_step'] or 0} of {run['total_steps'] or '?'}{pace}{eta} · "
            f"{plural(run['firing_alerts'], 'firing alert')}{gates}")


def show_curves(curve: pd.DataFrame, evals: pd.DataFrame, last_step: int, alert_steps: list[tuple[int, str]]) -> None:
    loss = metric_curve(curve, "loss", "loss", last_step=last_step, alert_steps=alert_steps,
                        band=("loss_min", "loss_max"), not_finite="loss_not_finite", dashed=evals)
    charts = [
        ("loss", loss),
        ("learning-rate", metric_curve(curve, "learning_rate", "learning rate", last_step=last_step,
                                       alert_steps=alert_steps)),
        ("grad-norm", metric_curve(curve, "grad_norm", "grad norm", last_step=last_step, alert_steps=alert_steps,
                                   band=("grad_norm", "grad_norm_max"))),
        ("throughput", metric_curve(curve, "tokens_per_s", "tokens/s", last_step=last_step,
                                    alert_steps=alert_steps)),
    ]
    for column, (name, chart) in zip(st.columns(2) + st.columns(2), charts):
        with column.container(key=f"chart-{name}"):
            st.altair_chart(chart, width="stretch")


def body(run_id: str) -> None:
    store, span = reader(), time_range()
    run = store.progress(run_id)
    if run is None:
        st.info("This run has no run-started event stored yet.")
        return
    st.markdown(status_line(run))
    if run["total_steps"]:
        st.progress(min(1.0, (run["last_step"] or 0) / run["total_steps"]))
    st.caption(f"{run['experiment']} · {run['run_name']} · {run['run_id']} · host {run['host']} · "
               f"{span.describe()}")
    curve = pd.DataFrame(store.curve(run_id, span.since, span.until, max_points=MAX_POINTS))
    incidents = store.alert_incidents(run_ids=[run_id], since=span.since, until=span.until)
    if curve.empty:
        st.caption("no steps logged in this time range")
    else:
        evals = pd.DataFrame(store.evals(run_id), columns=["step", "ts", "eval_loss"])
        if span.since is not None:
            evals = evals[evals["ts"] >= span.since.replace(tzinfo=None)]
        if span.until is not None:
            evals = evals[evals["ts"] <= span.until.replace(tzinfo=None)]
        steps_per_point = int(curve["steps"].max())
        st.caption(("dashed: eval loss · " if len(evals) else "") + "✕ along the top: NaN/Inf losses · "
                   "red rules: alerts" + (f" · {len(curve)} points of up to {steps_per_point} steps each "
                                           "(line: mean, band: min–max)" if steps_per_point > 1 else ""))
        last_step = max(run["total_steps"] or 0, int(curve["step"].max()))
        show_curves(curve, evals[["step", "eval_loss"]], last_step,
                    sorted({(i["step"], i["rule"]) for i in incidents if i["step"] is not None}))
    st.subheader("Alerts")
    if incidents:
        alerts = pd.DataFrame(incidents)[ALERT_COLUMNS].assign(fired_at=[when_text(i["fired_at"]) for i in incidents])
        st.dataframe(alerts.style.map(severity_style, subset=["severity"]), hide_index=True, width="stretch")
    else:
        st.caption("no alerts")


st.title("Training")
if (chosen := require_run()) is not None:
    live(lambda: body(chosen))
