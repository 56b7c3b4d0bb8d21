"""Which runs need a person first: the Fleet's order and highlights, and the run the other views open on.

A run with a firing block or critical alert comes first (a NaN loss, a stalled run: something is wrong now), then
one that failed, was stopped or was blocked by its quality gates (it ended badly and is waiting for a decision),
then one with other firing alerts, then the running ones, then the rest; within each, the most recently heard from
first."""

from __future__ import annotations

from datetime import datetime

from trainwire.infra.store.read import Row

SEVERE = frozenset({"block", "critical"})
ENDED_BADLY = frozenset({"failed", "stopped"})
ALERTING, ENDED_BADLY_RANK, WARNED, RUNNING, SETTLED = range(5)


def rank(run: Row) -> int:
    if run.get("urgent_alerts"):
        return ALERTING
    if run["status"] in ENDED_BADLY or run.get("gates") == "blocked":
        return ENDED_BADLY_RANK
    if run.get("firing_alerts"):
        return WARNED
    return RUNNING if run["status"] == "running" else SETTLED


def attention(run: Row) -> str:
    """Why a run is near the top, in words ("" when nothing calls for a person)."""
    reasons = []
    if run.get("urgent_alerts"):
        reasons.append(f"{run.get('worst_severity') or 'block'} alert firing")
    if run["status"] in ENDED_BADLY:
        reasons.append(run["status"])
    if run.get("gates") == "blocked":
        reasons.append("gates blocked")
    return ", ".join(reasons)


def by_urgency(runs: list[Row]) -> list[Row]:
    newest_first = sorted(runs, key=lambda run: run["last_event_at"] or datetime.min, reverse=True)
    return sorted(newest_first, key=rank)  # stable: recency decides within a rank


def most_urgent(runs: list[Row]) -> str | None:
    ranked = by_urgency(runs)
    return ranked[0]["run_id"] if ranked else None
