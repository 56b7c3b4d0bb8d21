"""Runs' recent history, for rebuilding detector state when a consumer first sees a run that is under way
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

from .base import raised_by_detectors


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
    ended: bool = False  # a run ended precedes the event, with no run started (a resumed process) after it


HistoryLoader = Callable[[HistoryRequest], RunHistory]


class HistoryUnavailableError(RuntimeError):
    """The store could not be read; worth retrying like a failed insert."""


# The runs asked about, one row each: (run, host, seq, ts) of the event each history must precede.
_ASKED = """asked AS (
  SELECT t.1 AS q_run, t.2 AS q_host, t.3 AS q_seq, t.4 AS q_ts
  FROM (SELECT arrayJoin(arrayZip({run_ids:Array(String)}, {hosts:Array(String)}, {seqs:Array(UInt64)},
                                  {ts_ms:Array(Int64)})) AS t))"""
_BEFORE = ("x.run_id IN {run_ids:Array(String)} AND ((x.host = q_host AND x.seq < q_seq) "
           "OR (x.host != q_host AND x.ts < fromUnixTimestamp64Milli(q_ts)))")
_ENVELOPE = "x.run_id AS run_id, x.experiment AS experiment, x.team AS team, x.host AS host, x.seq AS seq, " \
            "toUnixTimestamp64Milli(x.ts) AS ts_ms"
_STEP_COLUMNS = f"{_ENVELOPE}, x.step AS step, x.loss AS loss, x.grad_norm AS grad_norm, x.tokens_per_s AS tokens_per_s"
_STEPS = f"""
WITH {_ASKED}
SELECT * FROM (
  (SELECT {_STEP_COLUMNS} FROM steps AS x FINAL INNER JOIN asked ON x.run_id = q_run WHERE {_BEFORE}
   ORDER BY seq LIMIT {{first_steps:UInt32}} BY run_id)
  UNION ALL
  (SELECT {_STEP_COLUMNS} FROM steps AS x FINAL INNER JOIN asked ON x.run_id = q_run WHERE {_BEFORE}
   ORDER BY seq DESC LIMIT {{steps:UInt32}} BY run_id))
"""
_EVALS = f"""
WITH {_ASKED}
SELECT {_ENVELOPE}, x.step AS step, x.eval_loss AS eval_loss, x.eval_accuracy AS eval_accuracy,
       x.perplexity AS perplexity
FROM evals AS x FINAL INNER JOIN asked ON x.run_id = q_run WHERE {_BEFORE}
ORDER BY seq DESC LIMIT {{evals:UInt32}} BY run_id
"""
_CHECKPOINTS = f"""
WITH {_ASKED}
SELECT {_ENVELOPE}, x.step AS step, x.path AS path, x.eval_loss AS eval_loss, x.is_best AS is_best
FROM checkpoints AS x FINAL INNER JOIN asked ON x.run_id = q_run WHERE {_BEFORE}
ORDER BY seq DESC LIMIT {{checkpoints:UInt32}} BY run_id
"""
_GPU_SAMPLES = f"""
WITH {_ASKED}
SELECT {_ENVELOPE}, x.rank AS rank, x.gpu_index AS gpu_index, x.gpu_uuid AS gpu_uuid,
       x.utilization_pct AS utilization_pct, x.memory_used_mb AS memory_used_mb,
       x.memory_total_mb AS memory_total_mb, x.temperature_c AS temperature_c
FROM gpu_samples AS x FINAL INNER JOIN asked ON x.run_id = q_run WHERE {_BEFORE}
ORDER BY ts_ms DESC, seq DESC LIMIT {{gpu_samples:UInt32}} BY run_id, host, gpu_index
"""
# The latest state of each incident; on equal timestamps (a burst within one millisecond) resolved wins,
# since an incident resolves after it fires.
_OPEN_INCIDENTS = f"""
WITH {_ASKED}
SELECT run_id, rule, dedup_key, firing_id FROM (
  SELECT x.run_id AS run_id, x.rule AS rule, x.dedup_key AS dedup_key,
         argMax(x.state, (x.ts, x.state = 'resolved')) AS latest, max(x.ts) AS updated,
         argMaxIf(x.event_id, x.ts, x.state = 'firing') AS firing_id
  FROM alerts AS x FINAL INNER JOIN asked ON x.run_id = q_run
  WHERE x.run_id IN {{run_ids:Array(String)}} AND x.ts < fromUnixTimestamp64Milli(q_ts)
  GROUP BY run_id, rule, dedup_key)
WHERE latest = 'firing' ORDER BY updated
"""
# Runs whose latest run ended (up to the event) is not followed by a run started: over, unless resumed.
_ENDED = f"""
WITH {_ASKED}
SELECT e.run_id FROM
  (SELECT x.run_id AS run_id, max(x.ts) AS ended FROM run_ended AS x INNER JOIN asked ON x.run_id = q_run
   WHERE x.run_id IN {{run_ids:Array(String)}} AND x.ts <= fromUnixTimestamp64Milli(q_ts) GROUP BY run_id) AS e
  LEFT JOIN
  (SELECT x.run_id AS run_id, max(x.ts) AS started FROM run_started AS x INNER JOIN asked ON x.run_id = q_run
   WHERE x.run_id IN {{run_ids:Array(String)}} AND x.ts <= fromUnixTimestamp64Milli(q_ts) GROUP BY run_id) AS s
  ON e.run_id = s.run_id
WHERE s.run_id = '' OR e.ended >= s.started
"""
_QUERIES = (("step", _STEPS), ("eval", _EVALS), ("checkpoint", _CHECKPOINTS), ("gpu_sample", _GPU_SAMPLES))


class StoreHistory:
    """Reads runs' history from ClickHouse: five bounded queries for all the runs newly seen in one poll."""

    def __init__(self, client: Client):
        self._client = client

    def __call__(self, request: HistoryRequest) -> RunHistory:
        return self.load_many([request])[request.run_id]

    def load_many(self, requests: list[HistoryRequest]) -> dict[str, RunHistory]:
        """The history of each requested run (one request per run; sizes are the first request's)."""
        if not requests:
            return {}
        sizes = vars(requests[0])
        parameters = {"run_ids": [r.run_id for r in requests], "hosts": [r.host for r in requests],
                      "seqs": [r.seq for r in requests], "ts_ms": [r.ts_ms for r in requests],
                      **{name: sizes[name] for name in ("steps", "first_steps", "evals", "checkpoints",
                                                         "gpu_samples")}}
        try:
            events: dict[tuple[str, str, str, int], tuple[int, str, dict]] = {}
            for kind, sql in _QUERIES:
                for row in self._client.query(sql, parameters=parameters).named_results():
                    # keyed by identity: the first and last steps of a short run overlap
                    events[(row["run_id"], kind, row["host"], row["seq"])] = (row["ts_ms"], kind, row)
            incidents = self._client.query(_OPEN_INCIDENTS, parameters=parameters).result_rows
            ended = {row[0] for row in self._client.query(_ENDED, parameters=parameters).result_rows}
        except Exception as err:
            runs = ", ".join(r.run_id for r in requests[:3]) + (" …" if len(requests) > 3 else "")
            raise HistoryUnavailableError(f"reading the history of runs {runs} failed: {err}") from err
        histories = {r.run_id: RunHistory() for r in requests}
        for (run_id, *_), (ts_ms, kind, row) in sorted(events.items(), key=lambda e: (e[1][0], e[1][2]["seq"])):
            histories[run_id].events.append((kind, row))
        for run_id in ended:
            histories[run_id].ended = True
        for run_id, rule, key, firing_id in incidents:
            if raised_by_detectors(run_id, rule, key, firing_id):
                histories[run_id].open_incidents[rule] = key
        return histories
