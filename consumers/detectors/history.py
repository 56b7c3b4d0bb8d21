"""A run's recent history, for rebuilding detector state when a consumer first sees a run that is under way
(its partition moved here, or the consumer restarted).

Only what precedes the event being processed counts: after a crash the store can already hold the events (and
the alerts) that are now being replayed, and those must be detected again, not taken as history. "Precedes" is
the per-process sequence number on the event's own host, and the timestamp for other hosts (GPU samples of
other nodes count their own sequence). Alerts are taken up to (not including) the event's timestamp, so an
alert the event itself raised is raised, and published, again (same id: one stored row).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from clickhouse_connect.driver.client import Client


@dataclass(frozen=True)
class HistoryRequest:
    run_id: str
    host: str
    seq: int  # the event being processed: history is what came before it
    ts_ms: int
    steps: int  # the last ones…
    first_steps: int  # …and the run's first ones (its starting level)
    evals: int
    checkpoints: int
    gpu_samples: int  # per GPU


@dataclass
class RunHistory:
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (kind, record), oldest first
    open_incidents: dict[str, str] = field(default_factory=dict)  # rule id → dedup key of its firing incident


HistoryLoader = Callable[[HistoryRequest], RunHistory]


class HistoryUnavailableError(RuntimeError):
    """The store could not be read; worth retrying like a failed insert."""


_BEFORE = ("run_id = {run_id:String} AND ((host = {host:String} AND seq < {seq:UInt64}) "
           "OR (host != {host:String} AND ts < fromUnixTimestamp64Milli({ts_ms:Int64})))")
_ENVELOPE = "run_id, experiment, team, host, seq, toUnixTimestamp64Milli(ts) AS ts_ms"
_STEPS = f"""
SELECT * FROM (
  (SELECT {_ENVELOPE}, step, loss, grad_norm, tokens_per_s FROM steps FINAL WHERE {_BEFORE}
   ORDER BY seq LIMIT {{first_steps:UInt32}})
  UNION ALL
  (SELECT {_ENVELOPE}, step, loss, grad_norm, tokens_per_s FROM steps FINAL WHERE {_BEFORE}
   ORDER BY seq DESC LIMIT {{steps:UInt32}}))
"""
_EVALS = f"""
SELECT {_ENVELOPE}, step, eval_loss, eval_accuracy, perplexity FROM evals FINAL WHERE {_BEFORE}
ORDER BY seq DESC LIMIT {{evals:UInt32}}
"""
_CHECKPOINTS = f"""
SELECT {_ENVELOPE}, step, path, eval_loss, is_best FROM checkpoints FINAL WHERE {_BEFORE}
ORDER BY seq DESC LIMIT {{checkpoints:UInt32}}
"""
_GPU_SAMPLES = f"""
SELECT {_ENVELOPE}, rank, gpu_index, gpu_uuid, utilization_pct, memory_used_mb, memory_total_mb, temperature_c
FROM gpu_samples FINAL WHERE {_BEFORE}
ORDER BY ts DESC, seq DESC LIMIT {{gpu_samples:UInt32}} BY host, gpu_index
"""
# The latest state of each incident; on equal timestamps (a burst within one millisecond) resolved wins,
# since an incident resolves after it fires.
_OPEN_INCIDENTS = """
SELECT rule, dedup_key FROM (
  SELECT rule, dedup_key, argMax(state, (ts, state = 'resolved')) AS latest, max(ts) AS updated
  FROM alerts FINAL WHERE run_id = {run_id:String} AND ts < fromUnixTimestamp64Milli({ts_ms:Int64})
  GROUP BY rule, dedup_key)
WHERE latest = 'firing' ORDER BY updated
"""
_QUERIES = (("step", _STEPS), ("eval", _EVALS), ("checkpoint", _CHECKPOINTS), ("gpu_sample", _GPU_SAMPLES))


class StoreHistory:
    """Reads a run's history from ClickHouse: five bounded queries per run newly seen while under way."""

    def __init__(self, client: Client):
        self._client = client

    def __call__(self, request: HistoryRequest) -> RunHistory:
        parameters = vars(request)
        try:
            events: dict[tuple[str, str, int], tuple[int, str, dict]] = {}
            for kind, sql in _QUERIES:
                for row in self._client.query(sql, parameters=parameters).named_results():
                    events[(kind, row["host"], row["seq"])] = (row["ts_ms"], kind, row)  # first ∪ last steps
            rows = self._client.query(_OPEN_INCIDENTS, parameters=parameters).result_rows
        except Exception as err:
            raise HistoryUnavailableError(f"reading run {request.run_id}'s history failed: {err}") from err
        ordered = sorted(events.values(), key=lambda e: (e[0], e[2]["seq"]))
        return RunHistory([(kind, row) for _, kind, row in ordered], {rule: key for rule, key in rows})
