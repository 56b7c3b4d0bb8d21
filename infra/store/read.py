"""The read API: the one place the dashboard and the CLI get data from. Every query is parameterised."""

from __future__ import annotations

from datetime import datetime, timezone
from string import Template
from typing import Any

from clickhouse_connect.driver.client import Client

from .governance import GovernanceReads
from .views import ViewReads, bind_utc

EVENT_TABLES = ("run_started", "steps", "evals", "gpu_samples", "heartbeats", "checkpoints", "run_ended")
Row = dict[str, Any]

# `runs` holds each run's latest state, kept by materialized views (migration 003): no scan of raw steps. A run is
# under way while it has not ended since its latest start (a run resumed by a new process starts again).
_RUNS = """
WITH firing AS (SELECT run_id, countIf(state = 'firing') AS firing_alerts
                FROM (SELECT run_id, argMax(state, ts) AS state FROM alerts FINAL GROUP BY run_id, dedup_key)
                GROUP BY run_id),
     r.ended < r.started AS under_way
SELECT r.run_id AS run_id, r.exp AS experiment, r.name AS run_name, r.tm AS team, r.hst AS host,
       r.started AS started_at, if(under_way, 'running', r.st) AS status,
       if(under_way, NULL, r.ended) AS ended_at, r.total AS total_steps,
       if(r.n = 0, NULL, r.last) AS last_step, r.n AS steps_logged, r.seen AS last_event_at,
       if(under_way, r.last_loss_now, r.final_loss_at_end) AS final_loss, f.firing_alerts AS firing_alerts
FROM (SELECT run_id, max(experiment) AS exp, max(run_name) AS name, max(team) AS tm, max(host) AS hst,
             max(started_at) AS started, argMaxMerge(status) AS st,
             max(ended_at) AS ended, nullIf(max(total_steps), 0) AS total,
             max(last_step) AS last, sum(steps_logged) AS n, max(last_event_at) AS seen,
             argMaxMerge(last_loss) AS last_loss_now, argMaxMerge(final_loss) AS final_loss_at_end
      FROM runs GROUP BY run_id HAVING started > toDateTime64(0, 3, 'UTC')) AS r
LEFT JOIN firing AS f ON f.run_id = r.run_id
ORDER BY started_at DESC
"""


# A run resumed by a new process under its id has a run started (and maybe a run ended) per process: the summary
# is the latest process's, started when the first one started, under way unless it ended after its latest start.
# What the producer lost (events dropped, invalid, spooled, spool bytes; migration 005) is the latest process's: as
# its run ended says, or while under way as its latest heartbeat says (NULL from producers before those v2 events).
_RUN_SUMMARY = """
WITH {run_id:String} AS rid, e.run_id = '' OR e.ts < s.ts AS under_way
SELECT s.run_id AS run_id, s.experiment AS experiment, s.run_name AS run_name, s.team AS team,
       if(under_way, 'running', e.status) AS status,
       (SELECT min(ts) FROM run_started FINAL WHERE run_id = rid) AS started_at,
       if(under_way, NULL, e.ts) AS ended_at, if(under_way, NULL, e.error) AS error,
       s.total_steps AS total_steps,
       (SELECT count() FROM steps FINAL WHERE run_id = rid) AS steps_logged,
       (SELECT count() FROM evals FINAL WHERE run_id = rid) AS evals_logged,
       (SELECT count() FROM checkpoints FINAL WHERE run_id = rid AND NOT ifNull(deleted, false)) AS checkpoints,
       (SELECT max(step) FROM steps FINAL WHERE run_id = rid) AS last_step,
       if(under_way, (SELECT argMax(loss, step) FROM steps FINAL WHERE run_id = rid), e.final_loss) AS final_loss,
       if(under_way, if(h.ts >= s.ts, h.events_dropped, NULL), e.events_dropped) AS events_dropped,
       if(under_way, if(h.ts >= s.ts, h.events_invalid, NULL), e.events_invalid) AS events_invalid,
       if(under_way, if(h.ts >= s.ts, h.events_spooled, NULL), e.events_spooled) AS events_spooled,
       if(under_way, if(h.ts >= s.ts, h.spool_bytes, NULL), e.spool_bytes) AS spool_bytes
FROM (SELECT * FROM run_started FINAL WHERE run_id = rid ORDER BY ts DESC LIMIT 1) AS s
LEFT JOIN (SELECT * FROM run_ended FINAL WHERE run_id = rid ORDER BY ts DESC LIMIT 1) AS e ON e.run_id = s.run_id
LEFT JOIN (SELECT * FROM heartbeats FINAL WHERE run_id = rid ORDER BY ts DESC LIMIT 1) AS h ON h.run_id = s.run_id
"""


# --- Columnar reads: Arrow tables straight from ClickHouse (`query_arrow`), no Python per row. The public read API
# (trainwire/read.py) calls them in-process, or through `trainwire up`'s GET /arrow/NAME (api.py, ARROW_METHODS).
STEP_METRICS = ("epoch", "loss", "learning_rate", "grad_norm", "tokens_per_s", "samples_per_s", "batch_time_s",
                "tokens")
EVAL_METRICS = ("epoch", "eval_loss", "eval_accuracy", "perplexity", "runtime_s")
GPU_COLUMNS = ("host", "rank", "gpu_index", "gpu_name", "gpu_uuid", "utilization_pct", "memory_used_mb",
               "memory_total_mb", "temperature_c", "power_w", "sm_clock_mhz", "mem_clock_mhz")

# The CLI's run listing (`trainwire runs`) with what a search filters on: the latest start's user, tags and
# hyperparameters, and the latest gate evaluation's outcome (migration 004).
_RUNS_SEARCH = """
SELECT r.run_id AS run_id, r.experiment AS experiment, r.run_name AS run_name, r.team AS team, r.host AS host,
       r.started_at AS started_at, r.status AS status, r.ended_at AS ended_at, r.total_steps AS total_steps,
       r.last_step AS last_step, r.steps_logged AS steps_logged, r.last_event_at AS last_event_at,
       r.final_loss AS final_loss, r.firing_alerts AS firing_alerts, s.user AS user, s.tags AS tags,
       s.hyperparameters_json AS hyperparameters_json, nullIf(g.gate, '') AS gate
FROM (""" + _RUNS + """) AS r
LEFT JOIN (SELECT run_id, argMax(user, (ts, seq)) AS user, argMax(tags, (ts, seq)) AS tags,
                  argMax(hyperparameters_json, (ts, seq)) AS hyperparameters_json
           FROM run_started FINAL $run_filter GROUP BY run_id) AS s ON s.run_id = r.run_id
LEFT JOIN (SELECT run_id, argMax(overall, evaluated_at) AS gate FROM gate_results FINAL $run_filter
           GROUP BY run_id) AS g ON g.run_id = r.run_id
WHERE (empty({experiments:Array(String)}) OR has({experiments:Array(String)}, r.experiment))
  AND (empty({teams:Array(String)}) OR has({teams:Array(String)}, r.team))
  AND (empty({statuses:Array(String)}) OR has({statuses:Array(String)}, r.status))
  AND (empty({gates:Array(String)}) OR has({gates:Array(String)}, gate))
  AND r.started_at >= {since:DateTime64(3, 'UTC')} AND r.started_at <= {until:DateTime64(3, 'UTC')} $more
ORDER BY r.started_at DESC, r.run_id
"""

# Every stored run a RUN text could name (its id, an id prefix in any case, its name), as `match_run` judges them.
_RUN_CANDIDATES = """
SELECT run_id, run_name, started AS started_at
FROM (SELECT run_id, max(run_name) AS run_name, max(started_at) AS started FROM runs
      WHERE run_id IN (SELECT run_id FROM runs WHERE run_id = {text:String} OR run_name = {text:String}
                       OR startsWith(lower(run_id), lower({text:String})))
      GROUP BY run_id HAVING started > toDateTime64(0, 3, 'UTC'))
ORDER BY started_at DESC
"""


class ColumnarReads:
    """Reads answered as `pyarrow.Table`s: full resolution unless asked for the dashboard's buckets, times as
    timestamp[ms, UTC], NaN kept NaN (and apart from NULL: a value never logged)."""

    _client: Client  # provided by StoreReader

    def _arrow(self, sql: str, **parameters: Any):
        return self._client.query_arrow(sql, parameters=parameters)

    def runs_table(self, experiments: list[str] | None = None, teams: list[str] | None = None,
                   statuses: list[str] | None = None, gates: list[str] | None = None,
                   since: datetime | None = None, until: datetime | None = None,
                   tags: dict[str, str] | None = None, run_ids: list[str] | None = None):
        """`runs()`'s rows and `user`, `tags`, `hyperparameters_json`, `gate`, newest first; an empty or None
        filter keeps every value, `tags` keeps runs carrying every key with its value, [since, until] bounds the
        start."""
        params: dict[str, Any] = {"experiments": experiments or [], "teams": teams or [], "statuses": statuses or [],
                                  "gates": gates or [], "since": bind_utc(since) if since else _EPOCH,
                                  "until": bind_utc(until) if until else _FAR}
        more, run_filter = "", ""
        for i, (key, value) in enumerate((tags or {}).items()):
            more += f" AND s.tags[{{tag_key_{i}:String}}] = {{tag_value_{i}:String}}"
            params |= {f"tag_key_{i}": str(key), f"tag_value_{i}": str(value)}
        if run_ids is not None:
            run_filter = "WHERE run_id IN {run_ids:Array(String)}"
            more += " AND r.run_id IN {run_ids:Array(String)}"
            params["run_ids"] = list(run_ids)
        return self._arrow(Template(_RUNS_SEARCH).substitute(run_filter=run_filter, more=more), **params)

    def run_candidates(self, text: str):
        return self._arrow(_RUN_CANDIDATES, text=text.strip())

    def run_summary_table(self, run_id: str):
        """`run_summary`'s one row (none for an unknown run)."""
        return self._arrow(_RUN_SUMMARY, run_id=run_id)

    def steps_table(self, run_ids: list[str], metrics: list[str] | None = None, every: int | None = None):
        """Every step of the runs (step, ts, then the metrics: the step columns and the custom metrics `extra`
        holds; all those logged when None), by run and step, run_id first when several runs are asked for.
        `every`: only the steps that are a multiple of it."""
        where = "" if every is None else " AND step % {every:UInt64} = 0"
        return self._with_map_columns("steps", "extra", STEP_METRICS, run_ids, metrics, where,
                                      {} if every is None else {"every": _positive("every", every)})

    def evals_table(self, run_ids: list[str], metrics: list[str] | None = None):
        """Every evaluation (step, ts, the eval columns and the task metrics `metrics` holds), as `steps_table`."""
        return self._with_map_columns("evals", "metrics", EVAL_METRICS, run_ids, metrics, "", {})

    def _with_map_columns(self, table: str, map_column: str, fixed: tuple[str, ...], run_ids: list[str],
                          metrics: list[str] | None, where: str, params: dict[str, Any]):
        """step, ts, then the `fixed` columns and the keys of `map_column` that are named (when `metrics` is None:
        those the runs logged, every fixed one if there are no rows), each key a column of its own, NULL where a
        row lacks it; first a run_id column (dictionary-encoded: a run's id is not sent once per row) when more
        than one run is asked for. One query: the map is read with the rows and split here, in Arrow."""
        import pyarrow as pa
        import pyarrow.compute as pc

        columns = list(fixed) if metrics is None else [m for m in metrics if m in fixed]
        read_map = metrics is None or len(columns) < len(metrics)
        labelled = len(run_ids) > 1
        selected = ", ".join([*(["toLowCardinality(run_id) AS run_label"] if labelled else []), "step", "ts",
                              *columns, *([map_column] if read_map else [])])
        result = self._arrow(  # names from `fixed` and the schema: never a caller's text
            f"SELECT {selected} FROM {table} FINAL WHERE run_id IN {{run_ids:Array(String)}}{where} "
            "ORDER BY run_id, seq SETTINGS output_format_arrow_low_cardinality_as_dictionary = 1",
            run_ids=list(run_ids), **params)
        if labelled:
            result = result.rename_columns(["run_id", *result.column_names[1:]]).unify_dictionaries()
        if metrics is None and result.num_rows:  # what the runs logged: a column never logged is not sent
            result = result.drop_columns([name for name in fixed if result.column(name).null_count == result.num_rows])
        result = _in_step_order(result)
        leading = ["run_id", "step", "ts"] if labelled else ["step", "ts"]
        if not read_map:
            return result
        maps = result.column(map_column)
        reserved = {*fixed, "run_id", "step", "ts"}
        logged = sorted(set(pc.unique(maps.combine_chunks().keys).to_pylist()) - reserved)
        keys = logged if metrics is None else [m for m in metrics if m not in fixed]
        unknown = [key for key in keys if key not in logged]
        if unknown:
            raise ValueError(f"no metric {unknown[0]!r} in {table} of these runs: known are "
                             f"{', '.join([*fixed, *logged])}")
        result = result.drop_columns([map_column])
        for key in keys:
            result = result.append_column(key, pc.map_lookup(maps, pa.scalar(key), "first"))
        return result if metrics is None else result.select([*leading, *metrics])

    def curve_table(self, run_id: str, max_points: int):
        """The dashboard's buckets of a run's steps (`curve`), run id first."""
        import pyarrow as pa

        real = pa.float64()
        schema = pa.schema([("run_id", pa.string()), ("step", pa.uint64()), ("ts", pa.timestamp("ms", "UTC")),
                            ("steps", pa.uint64()), ("loss", real), ("loss_min", real), ("loss_max", real),
                            ("loss_not_finite", pa.uint64()), ("learning_rate", real), ("grad_norm", real),
                            ("grad_norm_max", real), ("tokens_per_s", real)])
        rows = [{"run_id": run_id, **row} for row in self.curve(run_id, max_points=max_points)]
        return pa.Table.from_pylist(rows, schema=schema)

    def gpu_samples_table(self, run_ids: list[str]):
        return self._arrow(f"SELECT run_id, ts, {', '.join(GPU_COLUMNS)} FROM gpu_samples FINAL "
                           "WHERE run_id IN {run_ids:Array(String)} ORDER BY run_id, ts, host, rank, gpu_index",
                           run_ids=list(run_ids))

    def gpu_series_table(self, run_id: str, max_points: int):
        """The dashboard's GPU buckets (`gpu_series`) of one run, run id first."""
        import pyarrow as pa

        real = pa.float64()
        schema = pa.schema([("run_id", pa.string()), ("host", pa.string()), ("gpu_index", pa.uint16()),
                            ("ts", pa.timestamp("ms", "UTC")), ("utilization_pct", real), ("memory_used_mb", real),
                            ("memory_total_mb", real), ("temperature_c", real), ("power_w", real),
                            ("samples", pa.uint64())])
        rows = [{"run_id": run_id, "ts": row.pop("t"), **row}
                for row in self.gpu_series(run_id=run_id, max_points=max_points)]
        return pa.Table.from_pylist(rows, schema=schema)

    def alerts_table(self, run_ids: list[str]):
        """Every alert transition (firing, resolved) of the runs, oldest first."""
        return self._arrow("SELECT run_id, ts, rule, severity, state, step, value, threshold, message, dedup_key "
                           "FROM alerts FINAL WHERE run_id IN {run_ids:Array(String)} ORDER BY ts, run_id",
                           run_ids=list(run_ids))

    def open_incidents_table(self, run_id: str):
        """A run's firing incidents with what `trainwire run` shows of them (`alert_incidents`, states firing)."""
        import pyarrow as pa

        schema = pa.schema([("rule", pa.string()), ("severity", pa.string()), ("step", pa.uint64()),
                            ("fired_at", pa.timestamp("ms", "UTC")), ("message", pa.string())])
        rows = self.alert_incidents(run_ids=[run_id], states=["firing"])
        return pa.Table.from_pylist([{name: row[name] for name in schema.names} for row in rows], schema=schema)

    def checkpoints_table(self, run_ids: list[str]):
        return self._arrow("SELECT run_id, step, ts, path, files, eval_loss, is_best, deleted FROM checkpoints FINAL "
                           "WHERE run_id IN {run_ids:Array(String)} ORDER BY run_id, step, seq",
                           run_ids=list(run_ids))

    def latest_gate_table(self, run_id: str):
        """The run's latest gate evaluation, its verdicts as stored (JSON)."""
        return self._arrow("SELECT evaluated_at, trigger, baseline, overall, gates_json FROM gate_results FINAL "
                           "WHERE run_id = {run_id:String} ORDER BY evaluated_at DESC LIMIT 1", run_id=run_id)

    def registry_stages_table(self):
        """`registry_stages` (the stages the audit log vouches for) as a table."""
        import pyarrow as pa

        schema = pa.schema([("run_id", pa.string()), ("stage", pa.string()), ("since", pa.timestamp("ms", "UTC")),
                            ("actor", pa.string())])
        return pa.Table.from_pylist(self.registry_stages(), schema=schema)


def _in_step_order(table):
    """Rows come in storage order (run, then seq: the order they were logged), which ClickHouse reads without a
    sort; a run that went back to an earlier step (restarted from a checkpoint) is sorted by step here, stably,
    so a step logged twice keeps its two rows in logging order, and the runs keep their order."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if table.num_rows < 2:
        return table
    step = table.column("step").combine_chunks()
    rising = pc.greater_equal(step[1:], step[:-1])
    if "run_id" in table.column_names:  # dictionary-encoded, its dictionaries unified: equal index, equal run
        run = table.column("run_id").combine_chunks().indices
        rising = pc.or_(pc.not_equal(run[1:], run[:-1]), rising)
    if pc.all(rising).as_py():
        return table
    if "run_id" not in table.column_names:
        return table.sort_by([("step", "ascending")])
    # Arrow sorts no dictionary column: by the ids as text, on this rare path
    table = table.append_column("_run", pc.cast(table.column("run_id"), pa.string()))
    return table.sort_by([("_run", "ascending"), ("step", "ascending")]).drop_columns(["_run"])


def _positive(name: str, value: int) -> int:
    if int(value) < 1:
        raise ValueError(f"{name} must be at least 1, not {value}")
    return int(value)


class StoreReader(GovernanceReads, ViewReads, ColumnarReads):
    def __init__(self, client: Client):
        self._client = client

    def _rows(self, sql: str, **parameters: Any) -> list[Row]:
        return list(self._client.query(sql, parameters=parameters).named_results())

    def migrated(self) -> bool:
        """Whether the tables exist: a store no ingest has started on yet has none, and reads nothing."""
        return bool(self._rows("EXISTS TABLE {table:Identifier}", table="run_started")[0]["result"])

    def runs(self) -> list[Row]:
        return self._rows(_RUNS)

    def run_summary(self, run_id: str) -> Row | None:
        """One run: identity, status, how much it logged, where it got to. None for an unknown run."""
        rows = self._rows(_RUN_SUMMARY, run_id=run_id)
        return rows[0] if rows else None

    def run_started(self, run_id: str) -> Row | None:
        rows = self._rows("SELECT * FROM run_started FINAL WHERE run_id = {run_id:String} LIMIT 1", run_id=run_id)
        return rows[0] if rows else None

    def checkpoints(self, run_id: str) -> list[Row]:
        return self._rows(
            "SELECT step, ts, path, files, eval_loss, is_best, deleted FROM checkpoints FINAL "
            "WHERE run_id = {run_id:String} ORDER BY step",
            run_id=run_id,
        )

    def steps(self, run_id: str) -> list[Row]:
        return self._rows(
            "SELECT step, ts, epoch, loss, learning_rate, grad_norm, tokens_per_s FROM steps FINAL "
            "WHERE run_id = {run_id:String} ORDER BY step",
            run_id=run_id,
        )

    def evals(self, run_id: str) -> list[Row]:
        return self._rows(
            "SELECT step, ts, eval_loss, eval_accuracy, perplexity FROM evals FINAL "
            "WHERE run_id = {run_id:String} ORDER BY step",
            run_id=run_id,
        )

    def alerts(self, run_id: str | None = None) -> list[Row]:
        return self._rows(
            "SELECT run_id, experiment, ts, rule, severity, state, step, value, threshold, message, dedup_key "
            "FROM alerts FINAL WHERE {run_id:String} = '' OR run_id = {run_id:String} ORDER BY ts",
            run_id=run_id or "",
        )

    def incidents(self, run_ids: list[str] | None = None) -> list[Row]:
        """One row per alert incident (dedup key) with its latest state, oldest first."""
        return self._rows(
            "SELECT run_id, rule, any(severity) AS severity, argMin(step, ts) AS step, argMax(state, ts) AS state, "
            "min(ts) AS fired_at, max(ts) AS updated_at, argMin(message, ts) AS message "
            "FROM alerts FINAL WHERE empty({run_ids:Array(String)}) OR has({run_ids:Array(String)}, run_id) "
            "GROUP BY run_id, rule, dedup_key ORDER BY fired_at",
            run_ids=run_ids or [],
        )

    def event_counts(self, run_ids: list[str] | None = None) -> dict[str, int]:
        """Distinct stored telemetry events per table (alerts excluded: consumers make those)."""
        where = "WHERE empty({run_ids:Array(String)}) OR has({run_ids:Array(String)}, run_id)"
        return {
            table: self._client.query(f"SELECT count() FROM {table} FINAL {where}",
                                      parameters={"run_ids": run_ids or []}).result_rows[0][0]
            for table in EVENT_TABLES
        }

    def events_stored(self, run_ids: list[str] | None = None) -> int:
        return sum(self.event_counts(run_ids).values())

    def dead_letters(self) -> list[Row]:
        return self._rows("SELECT ts, topic, partition, offset, reason FROM dead_letters FINAL ORDER BY ts")

    def list_dead_letters(self, since: datetime | None = None, topic: str | None = None,
                          reason_contains: str | None = None, limit: int | None = None) -> list[Row]:
        """Dead letters newest first, with their original bytes (base64) and their latest replay, if any."""
        return self._rows(_DEAD_LETTERS, since=since or _EPOCH, topic=topic or "",
                          reason_contains=reason_contains or "", limit=_NO_LIMIT if limit is None else limit)

    def record_dead_letter_replays(self, letters: list[Row], replayed_by: str) -> int:
        """Note each dead letter (by topic, partition and offset) as replayed now. The one write of the read API
        that is not governance: `trainwire up`'s API serves it, so a replay beside `up` records through it too."""
        now = datetime.now(timezone.utc)
        rows = [[letter["topic"], int(letter["partition"]), int(letter["offset"]), now, replayed_by]
                for letter in letters]
        if rows:
            self._client.insert("dead_letter_replays", rows, column_names=_REPLAY_COLUMNS)
        return len(rows)

    # --- Paging: silences, flapping and storms (docs/alerting.md) -------------------------------------------

    @property
    def client(self) -> Client:
        return self._client

    def silences(self, include_ended: bool = False) -> list[Row]:
        """Silences as last written (migration 008), oldest first: the active ones, or all with `include_ended`. A
        store no process has migrated to 008 yet has none."""
        if not self._rows("EXISTS TABLE {table:Identifier}", table="silences")[0]["result"]:
            return []
        return self._rows(
            "SELECT * FROM silences FINAL WHERE {include_all:Bool} OR (removed_at IS NULL AND ends_at > now64(3)) "
            "ORDER BY created_at, silence_id", include_all=include_ended)

    def run_hosts(self, run_ids: list[str]) -> dict[str, str]:
        """Each stored run's host (for silences and pages grouped by host); runs not stored yet are left out."""
        rows = self._rows("SELECT run_id, max(host) AS host FROM runs WHERE has({run_ids:Array(String)}, run_id) "
                          "GROUP BY run_id", run_ids=run_ids)
        return {row["run_id"]: row["host"] for row in rows}

    def alert_flapping(self, threshold: int, window_seconds: float, since: datetime | None = None,
                       until: datetime | None = None, limit: int = 200) -> list[Row]:
        """Each run and rule whose incidents fired more than `threshold` times within some `window_seconds`, in
        [since, until]: how many incidents and transitions (every firing and resolution is stored), the most in
        one window, when it began and last changed, and its latest state. Newest change first."""
        sql = _FLAPPING.format(window_ms=int(window_seconds * 1000))
        return self._rows(sql, threshold=int(threshold), since=since or _EPOCH, until=until or _FAR, limit=limit)

    def alert_storms(self, group_by: tuple[str, ...], gap_seconds: float, since: datetime | None = None,
                     until: datetime | None = None, min_runs: int = 2, limit: int = 200) -> list[Row]:
        """Incidents of one rule and the same `group_by` labels (experiment, team, host) that fired on at least
        `min_runs` runs, each within `gap_seconds` of the one before: the storms the alert consumer groups into
        one page. Newest first, with up to 50 of their run ids."""
        labels = [_STORM_LABELS[label] for label in group_by]  # a fixed set: never text from a caller
        partition = ", ".join(["rule", *labels])
        sql = _STORMS.format(partition=partition, labels="".join(f", {label}" for label in labels),
                             gap_ms=int(gap_seconds * 1000))
        return self._rows(sql, since=since or _EPOCH, until=until or _FAR, min_runs=min_runs, limit=limit)


# Incidents (one per dedup key) and, per run and rule, the most that fired within one window (a range frame over
# milliseconds since the epoch).
_INCIDENTS_IN_RANGE = """
SELECT run_id, rule, dedup_key, any(experiment) AS experiment, any(team) AS team, any(severity) AS severity,
       min(ts) AS fired_at, max(ts) AS updated_at, argMax(state, (ts, state = 'resolved')) AS state,
       count() AS transitions
FROM alerts FINAL WHERE ts >= {{since:DateTime64(3, 'UTC')}} AND ts <= {{until:DateTime64(3, 'UTC')}}
GROUP BY run_id, rule, dedup_key
"""
_FLAPPING = """
SELECT run_id, rule, any(experiment) AS experiment, any(team) AS team, any(severity) AS severity,
       count() AS incidents, sum(transitions) AS transitions, max(in_window) AS most_in_window,
       min(fired_at) AS first_fired_at, max(updated_at) AS last_change_at, argMax(state, updated_at) AS state
FROM (SELECT *, count() OVER (PARTITION BY run_id, rule ORDER BY toUnixTimestamp64Milli(fired_at)
                              RANGE BETWEEN {window_ms} PRECEDING AND CURRENT ROW) AS in_window
      FROM (""" + _INCIDENTS_IN_RANGE + """))
GROUP BY run_id, rule HAVING most_in_window > {{threshold:UInt32}}
ORDER BY last_change_at DESC LIMIT {{limit:UInt32}}
"""
_STORM_LABELS = {"experiment": "experiment", "team": "team", "host": "host"}
_STORMS = """
SELECT rule{labels}, min(fired_at) AS started_at, max(fired_at) AS last_fired_at, uniqExact(run_id) AS runs,
       count() AS incidents, countIf(state = 'firing') AS firing, any(severity) AS severity,
       arraySlice(arraySort(groupUniqArray(run_id)), 1, 50) AS run_ids
FROM (SELECT *, sum(gap_ms > {gap_ms}) OVER (PARTITION BY {partition} ORDER BY fired_at, run_id
                                             ROWS UNBOUNDED PRECEDING) AS storm
      FROM (SELECT *, toUnixTimestamp64Milli(fired_at) - lagInFrame(toUnixTimestamp64Milli(fired_at), 1, 0)
                      OVER (PARTITION BY {partition} ORDER BY fired_at, run_id
                            ROWS BETWEEN 1 PRECEDING AND CURRENT ROW) AS gap_ms
            FROM (SELECT i.*, h.host AS host FROM (""" + _INCIDENTS_IN_RANGE + """) AS i
                  LEFT JOIN (SELECT run_id, max(host) AS host FROM runs GROUP BY run_id) AS h ON h.run_id = i.run_id)))
GROUP BY rule{labels}, storm HAVING runs >= {{min_runs:UInt32}}
ORDER BY started_at DESC LIMIT {{limit:UInt32}}
"""
_FAR = datetime(2200, 1, 1, tzinfo=timezone.utc)

# Newest first; `GLOBAL` so that on a cluster each shard joins the replays gathered once (migration 006).
_DEAD_LETTERS = """
SELECT d.ts AS ts, d.topic AS topic, d.partition AS partition, d.offset AS offset, d.reason AS reason,
       base64Encode(d.payload) AS payload_base64, r.replayed_at AS replayed_at, r.replayed_by AS replayed_by
FROM (SELECT * FROM dead_letters FINAL
      WHERE ts >= {since:DateTime64(3, 'UTC')} AND ({topic:String} = '' OR topic = {topic:String})
        AND positionCaseInsensitiveUTF8(reason, {reason_contains:String}) > 0
      ORDER BY ts DESC, topic, partition, offset DESC LIMIT {limit:UInt64}) AS d
GLOBAL LEFT JOIN (SELECT topic, partition, offset, replayed_at, replayed_by FROM dead_letter_replays FINAL) AS r
  ON r.topic = d.topic AND r.partition = d.partition AND r.offset = d.offset
ORDER BY ts DESC, topic, partition, offset DESC
SETTINGS join_use_nulls = 1
"""
_REPLAY_COLUMNS = ["topic", "partition", "offset", "replayed_at", "replayed_by"]
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_NO_LIMIT = 2**63

