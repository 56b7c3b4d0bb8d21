"""Which runs need a person first: the Fleet's order and highlights, and the run the other views open on.

The store ranks the fleet (`urgency`, infra/store/views.py), so a page of 10,000 runs is cut after ranking: a run
with a firing block or critical alert comes first (a NaN loss, a stalled run: something is wrong now), then one that
failed, was stopped or was blocked by its quality gates (it ended badly and is waiting for a decision), then one with
other firing alerts, then the running ones, then the rest; within each, the most recently heard from first."""

from __future__ import annotations

from trainwire.infra.store.read import Row, StoreReader

ENDED_BADLY = frozenset({"failed", "stopped"})


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


def most_urgent(store: StoreReader) -> str | None:
    runs = store.fleet_page(limit=1)["runs"]
    return runs[0]["run_id"] if runs else None
