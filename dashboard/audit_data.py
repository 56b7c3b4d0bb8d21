"""What the Audit view shows and exports for a run, read through the read API."""

from __future__ import annotations

from typing import Any

from trainwire.infra.store.api import to_json
from trainwire.infra.store.read import StoreReader

# The reads `trainwire.consumers.governance` backs (infra/store/governance.py). A reader without one, or a run
# with nothing recorded yet, shows that section as "not evaluated yet".
GOVERNANCE_READS = {"gates": "latest_gates", "registry": "registry_history", "audit_record": "stored_audit_record",
                    "unvouched": "unvouched_transitions"}


def governance(store: StoreReader, run_id: str) -> dict[str, Any]:
    """The run's latest gate evaluation, registry transitions and stored audit record; None for each missing."""
    def ask(method: str) -> Any:
        read = getattr(store, method, None)
        return (read(run_id) or None) if read is not None else None

    return {section: ask(method) for section, method in GOVERNANCE_READS.items()}


def audit_export(store: StoreReader, run_id: str) -> dict[str, Any] | None:
    """The download: governance's audit record when it stored one, and beside it either way the lineage, the
    checkpoints and the run's end as stored (hashes `sha256:<hex>`, timestamps ISO 8601 UTC). None for an
    unknown run."""
    started = store.run_started(run_id)
    if started is None:
        return None
    return to_json({"run_id": run_id, **governance(store, run_id), "lineage": started,
                    "checkpoints": store.checkpoints(run_id), "run_ended": store.run_ended(run_id)})
