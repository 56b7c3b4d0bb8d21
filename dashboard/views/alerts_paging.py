"""What the Alerts and Fleet views show of paging: active silences, flapping runs and rules, and storms (incidents of
one rule on many runs at once), as the alert consumer pages them (docs/alerting.md). Flapping and storms are worked
out from the stored alerts with the deployment's own `[alerting]` settings, so they are the same from any machine."""

from __future__ import annotations

from datetime import datetime, timezone

import pandas as pd
import streamlit as st

from trainwire.dashboard.shared import TimeRange, ago, duration, labels, plural, reader
from trainwire.infra.config import load_settings
from trainwire.infra.store.read import Row
from trainwire.infra.store.silences import Silence


def _label(run_id: str) -> str:
    return labels().get(run_id, run_id[:8])


def active_silences() -> list[Silence]:
    return [Silence.from_row(row) for row in reader().silences()]


def silence_marks(runs: list[Row], silences: list[Silence]) -> list[str]:
    """Per run: "until HH:MM UTC (reason)" when a silence holds all its pages, the rules held when only some are,
    "" when none is."""
    now, marks = datetime.now(timezone.utc), []
    for run in runs:
        matching = [s for s in silences if s.active(now) and s.matches(run["run_id"], run["experiment"], s.rule,
                                                                       run.get("host") or "")]
        whole = [s for s in matching if not s.rule]
        if whole:
            last = max(whole, key=lambda s: s.ended_at)
            marks.append(f"until {last.ended_at:%H:%M} UTC ({last.reason})")
        else:
            marks.append(", ".join(sorted({s.rule for s in matching})))
    return marks


def silences_section() -> None:
    silences = active_silences()
    st.subheader("Silences")
    if not silences:
        st.caption("no active silence (`trainwire alerts silence` makes one)")
        return
    now = datetime.now(timezone.utc)
    frame = pd.DataFrame([{"silence": s.silence_id, "matchers": s.describe_matchers(),
                           "ends in": duration((s.ended_at - now).total_seconds()), "by": s.created_by,
                           "reason": s.reason, "since": ago(s.starts_at, now)} for s in silences])
    st.caption(f"{plural(len(frame), 'active silence')}: matching pages are recorded, not sent; what still fires "
               "when one ends is paged then")
    st.dataframe(frame, hide_index=True, width="stretch")


def flapping_section(span: TimeRange, runs: list[str], rules: list[str]) -> None:
    alerting = load_settings().alerting
    rows = [r for r in reader().alert_flapping(alerting.flap_threshold, alerting.flap_window_seconds, span.since,
                                               span.until)
            if (not runs or r["run_id"] in runs) and (not rules or r["rule"] in rules)]
    window = duration(alerting.flap_window_seconds)
    st.subheader("Flapping")
    if not rows:
        st.caption(f"no run and rule fired more than {alerting.flap_threshold} times within {window}")
        return
    frame = pd.DataFrame([{"run": _label(r["run_id"]), "rule": r["rule"], "state": r["state"],
                           "incidents": r["incidents"], "transitions": r["transitions"],
                           f"most in {window}": r["most_in_window"], "first fired": r["first_fired_at"],
                           "last change": r["last_change_at"]} for r in rows])
    st.caption(f"{plural(len(frame), 'run and rule')} flapping: paged as one incident each, resolved once clear "
               f"for {duration(alerting.flap_settle_seconds)}; every crossing is stored")
    st.dataframe(frame, hide_index=True, width="stretch")


def storms_section(span: TimeRange, rules: list[str]) -> None:
    alerting = load_settings().alerting
    st.subheader("Storms")
    if alerting.group_wait_seconds <= 0:
        st.caption("pages are not grouped (alerting.group_wait_seconds = 0)")
        return
    rows = [r for r in reader().alert_storms(alerting.group_by, alerting.group_wait_seconds, span.since, span.until)
            if not rules or r["rule"] in rules]
    if not rows:
        st.caption("no rule fired on several runs at once")
        return
    frame = pd.DataFrame([{
        "rule": r["rule"], "group": ", ".join(f"{name}={r[name]}" for name in alerting.group_by) or "–",
        "runs": r["runs"], "firing": r["firing"], "started": r["started_at"],
        "lasted": duration((r["last_fired_at"] - r["started_at"]).total_seconds()),
        "run list": ", ".join(map(_label, r["run_ids"])) + (" …" if r["runs"] > len(r["run_ids"]) else "")}
        for r in rows])
    st.caption(f"{plural(len(frame), 'storm')}: incidents of one rule grouped by "
               f"{', '.join(alerting.group_by) or 'rule'}, each within {duration(alerting.group_wait_seconds)} of "
               "the last; each sink got the first at once and the rest batched into one page per "
               f"{duration(alerting.group_wait_seconds)}")
    st.dataframe(frame, hide_index=True, width="stretch")
