"""Altair charts of the views. Drawn as SVG so each point is an element (with an ARIA label) a browser test can
find; every series is already downsampled by the read API, so the element count stays small."""

from __future__ import annotations

from dataclasses import dataclass

import altair as alt
import pandas as pd

SVG = {"embedOptions": {"renderer": "svg"}}
ALERT_RED = "#d62728"
POINTS_UP_TO = 150  # show each point as a marker while a curve has at most this many
LEGEND_LABEL_PX = 480  # a run's whole label in a legend, "⚠ NaN loss" at its end included (Vega-Lite cuts at 160 px)


def metric_curve(frame: pd.DataFrame, field: str, label: str, *, last_step: int | None = None,
                 alert_steps: list[tuple[int, str]] = (), band: tuple[str, str] | None = None,
                 not_finite: str | None = None, dashed: pd.DataFrame | None = None, height: int = 240
                 ) -> alt.LayerChart:
    """`field` over steps; a shaded min–max band where a point stands for several steps; a red ✕ along the top
    for each bucket holding NaN/±Inf values (they cannot be drawn where they are); a dashed red rule at each
    step an alert fired on; `dashed` (step and one value column) as a dashed orange line, e.g. eval loss."""
    x = alt.X("step:Q", title="step", scale=alt.Scale(domain=[0, last_step]) if last_step else alt.Undefined)
    values = frame.dropna(subset=[field])
    layers = []
    if band and len(values) and (frame["steps"] > 1).any():
        layers.append(alt.Chart(values).mark_area(opacity=0.2).encode(
            x=x, y=alt.Y(f"{band[0]}:Q"), y2=alt.Y2(f"{band[1]}:Q")))
    layers.append(alt.Chart(values).mark_line(point=len(values) <= POINTS_UP_TO).encode(
        x=x, y=alt.Y(f"{field}:Q", title=label, scale=alt.Scale(zero=False)),
        tooltip=[alt.Tooltip("step:Q"), alt.Tooltip(f"{field}:Q", format=".4g")],
    ))
    if dashed is not None and len(dashed.dropna()):
        value = next(c for c in dashed.columns if c != "step")
        layers.append(alt.Chart(dashed.dropna()).mark_line(color="#ff7f0e", strokeDash=[6, 3]).encode(
            x=x, y=alt.Y(f"{value}:Q"), tooltip=[alt.Tooltip("step:Q"), alt.Tooltip(f"{value}:Q", format=".4g")]))
    if not_finite is not None:
        bad = frame[frame[not_finite] > 0]
        if len(bad):
            top = values[field].max() if len(values) else 0.0
            layers.append(alt.Chart(bad.assign(at=top)).mark_point(shape="cross", color=ALERT_RED, size=80).encode(
                x=x, y=alt.Y("at:Q"),
                tooltip=[alt.Tooltip("step:Q", title="up to step"),
                         alt.Tooltip(f"{not_finite}:Q", title=f"{label}: NaN/Inf values")],
            ))
    if alert_steps:
        rules = pd.DataFrame(alert_steps, columns=["step", "rule"])
        layers.append(alt.Chart(rules).mark_rule(color=ALERT_RED, strokeDash=[4, 3]).encode(
            x=x, tooltip=["rule", "step"]))
    return alt.layer(*layers).properties(height=height, usermeta=SVG)


@dataclass(frozen=True)
class Threshold:
    """A detector's threshold drawn on a chart: where, and what it is ("gpu_temperature_high ≥ 85 °C")."""

    value: float
    label: str


def time_lines(frame: pd.DataFrame, field: str, label: str, series: str, *, threshold: Threshold | None = None,
               height: int = 220) -> alt.LayerChart:
    """`field` over time, one line per value of `series`; an optional dashed threshold, labelled."""
    chart = alt.Chart(frame).mark_line(point=len(frame) <= POINTS_UP_TO).encode(
        x=alt.X("t:T", title=None), y=alt.Y(f"{field}:Q", title=label, scale=alt.Scale(zero=False)),
        color=alt.Color(f"{series}:N", title=None, legend=alt.Legend(orient="bottom", labelLimit=LEGEND_LABEL_PX)),
        tooltip=[alt.Tooltip("t:T", format="%Y-%m-%d %H:%M:%S"), series, alt.Tooltip(f"{field}:Q", format=".4g")],
    )
    layers = [chart]
    if threshold is not None:
        line = alt.Chart(pd.DataFrame({"y": [threshold.value], "threshold": [threshold.label]}))
        layers.append(line.mark_rule(color=ALERT_RED, strokeDash=[4, 3]).encode(y="y:Q", tooltip=["threshold"]))
        layers.append(line.mark_text(color=ALERT_RED, align="left", baseline="bottom", x=4, dy=-2).encode(
            y="y:Q", text="threshold"))
    return alt.layer(*layers).properties(height=height, usermeta=SVG)


def overlay(frame: pd.DataFrame, field: str, label: str, series: str, height: int = 360) -> alt.Chart:
    """One curve per value of `series` over steps, in the same axes."""
    return alt.Chart(frame.dropna(subset=[field])).mark_line().encode(
        x=alt.X("step:Q", title="step"), y=alt.Y(f"{field}:Q", title=label, scale=alt.Scale(zero=False)),
        color=alt.Color(f"{series}:N", title=None, legend=alt.Legend(orient="bottom", labelLimit=LEGEND_LABEL_PX)),
        tooltip=[series, "step", alt.Tooltip(f"{field}:Q", format=".4g")],
    ).properties(height=height, usermeta=SVG)
