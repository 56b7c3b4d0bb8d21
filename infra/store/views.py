"""Read queries behind the dashboard's views: downsampled curves, the fleet, GPU and throughput series, run
comparison and alert incidents with filters.

A mixin of `StoreReader`, so `trainwire up`'s loopback read API serves them like every other read. Every series
comes back downsampled in ClickHouse to at most `max_points` points: short ranges bucket the raw rows, long ones
read the rollups of migration 003 (`steps_100`, `steps_1m`, `gpu_1m`), so a year of history costs what an hour
does. A bucket's NaN/±Inf losses are counted apart (`loss_not_finite`), never averaged in or away.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta, timezone
from string import Template
from typing import Any

Row = dict[str, Any]

DEFAULT_POINTS = 500
# Read raw rows while a range holds at most this many per point; beyond that the rollups are as exact as needed.
RAW_ROWS_PER_POINT = 10
ROLLUP_STEPS = 100  # steps_100: one row per run per 100 steps
ROLLUP_SECONDS = 60  # steps_1m and gpu_1m: one row per run (per GPU) per minute
SEED_FIELDS = ("seed", "data_seed", "numpy_seed")  # run started's seeds, compared with the hyperparameters

# `prefer_column_name_to_alias`: an aggregate named like the column it reads (`max(ts) AS ts`) reads the column.
_CURVE_RAW = """
SELECT intDiv(step - {lo:UInt64}, {width:UInt64}) AS b, max(step) AS step, max(ts) AS ts, count() AS steps,
       avgIfOrNull(loss, isFinite(loss)) AS loss, minIfOrNull(loss, isFinite(loss)) AS loss_min,
       maxIfOrNull(loss, isFinite(loss)) AS loss_max, countIf(NOT isFinite(loss)) AS loss_not_finite,
       argMax(learning_rate, step) AS learning_rate, avgIfOrNull(grad_norm, isFinite(grad_norm)) AS grad_norm,
       maxIfOrNull(grad_norm, isFinite(grad_norm)) AS grad_norm_max, avgOrNull(tokens_per_s) AS tokens_per_s
FROM steps FINAL WHERE run_id = {run_id:String} $time
GROUP BY b ORDER BY b SETTINGS prefer_column_name_to_alias = 1
"""

_CURVE_ROLLUP = """
SELECT intDiv(bucket - {lo:UInt64}, {width:UInt64}) AS b, max(last_step) AS step, max(last_ts) AS ts,
       sum(steps) AS steps, sum(loss_sum) / nullIf(sum(loss_count), 0) AS loss, min(loss_min) AS loss_min,
       max(loss_max) AS loss_max, sum(loss_not_finite) AS loss_not_finite,
       argMaxMerge(learning_rate_last) AS learning_rate,
       sum(grad_norm_sum) / nullIf(sum(grad_norm_count), 0) AS grad_norm, max(grad_norm_max) AS grad_norm_max,
       sum(tokens_per_s_sum) / nullIf(sum(tokens_per_s_count), 0) AS tokens_per_s
FROM steps_100 WHERE run_id = {run_id:String} $time
GROUP BY b ORDER BY b SETTINGS prefer_column_name_to_alias = 1
"""

# Which runs need a person first (`urgency`, lowest first): a firing block or critical alert (something is wrong
# now), then a run that failed, was stopped or was blocked by its gates (it ended badly and waits for a decision),
# then one with other firing alerts, then the running ones, then the rest.
URGENT_ALERT, ENDED_BADLY, WARNED, RUNNING, SETTLED = range(5)
FLEET_PAGE = 50

# Each run's latest state from the `runs` table (migration 003), its firing incidents (how many are block or
# critical, the most severe), the overall outcome of its latest gate evaluation (migration 004) and its urgency;
# most urgent first, then the most recently heard from (the run id breaks ties, so pages never overlap).
_FLEET = f"""
WITH latest AS (SELECT run_id, rule, any(severity) AS severity, argMax(state, ts) AS state FROM alerts FINAL
                $alert_filter GROUP BY run_id, rule, dedup_key),
     firing AS (SELECT run_id, count() AS firing_alerts, groupUniqArray(rule) AS firing_rules,
                       countIf(severity IN ('block', 'critical')) AS urgent_alerts,
                       multiIf(countIf(severity = 'block') > 0, 'block', countIf(severity = 'critical') > 0,
                               'critical', countIf(severity = 'warning') > 0, 'warning', 'info') AS worst_severity
                FROM latest WHERE state = 'firing' GROUP BY run_id),
     gates AS (SELECT run_id, argMax(overall, evaluated_at) AS gates FROM gate_results FINAL $alert_filter
               GROUP BY run_id)
SELECT r.run_id AS run_id, r.exp AS experiment, r.name AS run_name, r.tm AS team, r.hst AS host,
       r.usr AS user, r.started AS started_at, r.st AS status, r.ended AS ended_at, r.total AS total_steps,
       if(r.n = 0, NULL, r.last) AS last_step, r.n AS steps_logged, r.seen AS last_event_at,
       r.last_loss AS last_loss, ifNull(f.firing_alerts, 0) AS firing_alerts, f.firing_rules AS firing_rules,
       ifNull(f.urgent_alerts, 0) AS urgent_alerts, if(f.firing_alerts > 0, f.worst_severity, NULL) AS worst_severity,
       if(g.gates = '', NULL, g.gates) AS gates,
       multiIf(urgent_alerts > 0, {URGENT_ALERT}, r.st IN ('failed', 'stopped') OR g.gates = 'blocked', {ENDED_BADLY},
               firing_alerts > 0, {WARNED}, r.st = 'running', {RUNNING}, {SETTLED}) AS urgency
FROM (SELECT run_id, max(experiment) AS exp, max(run_name) AS name, max(team) AS tm, max(host) AS hst,
             max(user) AS usr, max(started_at) AS started, argMaxMerge(status) AS st,
             nullIf(max(ended_at), toDateTime64(0, 3, 'UTC')) AS ended, nullIf(max(total_steps), 0) AS total,
             max(last_step) AS last, sum(steps_logged) AS n, max(last_event_at) AS seen,
             argMaxMerge(last_loss) AS last_loss
      FROM runs $run_filter GROUP BY run_id
      HAVING started > toDateTime64(0, 3, 'UTC') $since_filter $search_filter) AS r
LEFT JOIN firing AS f ON f.run_id = r.run_id
LEFT JOIN gates AS g ON g.run_id = r.run_id
ORDER BY urgency, last_event_at DESC, run_id
"""
# Every search term is found, ignoring case, in one of a run's id, name, experiment, team, host, user or status.
_FLEET_SEARCH = ("AND arrayAll(term -> positionCaseInsensitiveUTF8(concatWithSeparator('\\n', run_id, name, exp, tm, "
                 "hst, usr, st), term) > 0, {terms:Array(String)})")
# What a page of the fleet adds up to over every run it was cut from, each as an aggregate of the fleet's rows.
_QUIET = "status = 'running' AND last_event_at < {quiet_before:DateTime64(3, 'UTC')}"
_FLEET_TOTALS = {
    "runs": "count()", "running": "countIf(status = 'running')", "quiet": f"countIf({_QUIET})",
    "urgent": f"countIf(urgency = {URGENT_ALERT})", "firing_alerts": "sum(firing_alerts)",
    "silenced": "countIf(arrayExists(m -> (m.1 = '' OR m.1 = run_id) AND (m.2 = '' OR m.2 = experiment) AND "
                "(m.3 = '' OR m.3 = host), {silenced_by:Array(Tuple(String, String, String))}))",
}
# A page with the totals beside each row (window aggregates over the whole fleet): one pass over the fleet.
_FLEET_PAGE = (f"SELECT *, {_QUIET} AS quiet, "
               + ", ".join(f"{total} OVER () AS total_{name}" for name, total in _FLEET_TOTALS.items())
               + " FROM ($fleet) ORDER BY urgency, last_event_at DESC, run_id "
                 "LIMIT {limit:UInt64} OFFSET {offset:UInt64}")
_FLEET_SUMMARY = "SELECT " + ", ".join(f"{total} AS {name}" for name, total in _FLEET_TOTALS.items()) + " FROM ($fleet)"

_GPU_RAW = """
SELECT host, gpu_index, toDateTime(intDiv(toUnixTimestamp(ts), {width:UInt32}) * {width:UInt32}, 'UTC') AS t,
       avg(utilization_pct) AS utilization_pct, max(memory_used_mb) AS memory_used_mb,
       max(memory_total_mb) AS memory_total_mb, max(temperature_c) AS temperature_c, avg(power_w) AS power_w,
       count() AS samples
FROM gpu_samples FINAL WHERE $where
GROUP BY host, gpu_index, t ORDER BY host, gpu_index, t SETTINGS prefer_column_name_to_alias = 1
"""

_GPU_ROLLUP = """
SELECT host, gpu_index, toDateTime(intDiv(toUnixTimestamp(minute), {width:UInt32}) * {width:UInt32}, 'UTC') AS t,
       sum(utilization_sum) / nullIf(sum(utilization_count), 0) AS utilization_pct,
       max(memory_used_max) AS memory_used_mb, max(memory_total_max) AS memory_total_mb,
       max(temperature_max) AS temperature_c, sum(power_sum) / nullIf(sum(power_count), 0) AS power_w,
       sum(samples) AS samples
FROM gpu_1m WHERE $where
GROUP BY host, gpu_index, t ORDER BY host, gpu_index, t SETTINGS prefer_column_name_to_alias = 1
"""

_THROUGHPUT_RAW = """
SELECT run_id, toDateTime(intDiv(toUnixTimestamp(ts), {width:UInt32}) * {width:UInt32}, 'UTC') AS t,
       avg(tokens_per_s) AS tokens_per_s, count() AS steps, max(step) AS last_step
FROM steps FINAL WHERE $where
GROUP BY run_id, t ORDER BY run_id, t SETTINGS prefer_column_name_to_alias = 1
"""

_THROUGHPUT_ROLLUP = """
SELECT run_id, toDateTime(intDiv(toUnixTimestamp(minute), {width:UInt32}) * {width:UInt32}, 'UTC') AS t,
       sum(tokens_per_s_sum) / nullIf(sum(tokens_per_s_count), 0) AS tokens_per_s, sum(steps) AS steps,
       max(last_step) AS last_step
FROM steps_1m WHERE $where
GROUP BY run_id, t ORDER BY run_id, t SETTINGS prefer_column_name_to_alias = 1
"""

_INCIDENTS = """
SELECT run_id, any(experiment) AS experiment, any(team) AS team, rule, any(severity) AS severity,
       argMin(step, ts) AS step, argMax(state, ts) AS state, min(ts) AS fired_at, max(ts) AS updated_at,
       if(argMax(state, ts) = 'resolved', max(ts), NULL) AS resolved_at, argMin(message, ts) AS message,
       argMin(value, ts) AS value, argMin(threshold, ts) AS threshold
FROM alerts FINAL
WHERE (empty({run_ids:Array(String)}) OR has({run_ids:Array(String)}, run_id))
  AND (empty({rules:Array(String)}) OR has({rules:Array(String)}, rule))
  AND (empty({severities:Array(String)}) OR has({severities:Array(String)}, severity))
  AND (empty({teams:Array(String)}) OR has({teams:Array(String)}, team))
GROUP BY run_id, rule, dedup_key
HAVING (empty({states:Array(String)}) OR has({states:Array(String)}, argMax(state, ts))) $time
"""


def bind_utc(value: datetime) -> datetime:
    """A naive UTC datetime, as ClickHouse binds a DateTime64(3, 'UTC') parameter."""
    return value.astimezone(timezone.utc).replace(tzinfo=None) if value.tzinfo else value


def _between(since: datetime | None, until: datetime | None, first: str, last: str | None = None
             ) -> tuple[str, dict[str, Any]]:
    """`AND …` conditions keeping rows whose [first, last] overlaps [since, until], and their parameters."""
    sql, params = "", {}
    if since is not None:
        sql += f" AND {last or first} >= {{since:DateTime64(3, 'UTC')}}"
        params["since"] = bind_utc(since)
    if until is not None:
        sql += f" AND {first} <= {{until:DateTime64(3, 'UTC')}}"
        params["until"] = bind_utc(until)
    return sql, params


def _incidents_sql(run_ids: list[str] | None, rules: list[str] | None, severities: list[str] | None,
                   teams: list[str] | None, states: list[str] | None, since: datetime | None,
                   until: datetime | None) -> tuple[str, dict[str, Any]]:
    time_sql, time_params = _between(since, until, "fired_at", "updated_at")
    return Template(_INCIDENTS).substitute(time=time_sql), {
        "run_ids": run_ids or [], "rules": rules or [], "severities": severities or [], "teams": teams or [],
        "states": states or [], **time_params}


def _seconds(value: datetime) -> float:
    return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()


def _finite_points(max_points: int) -> int:
    if max_points < 1:
        raise ValueError(f"max_points must be at least 1, not {max_points}")
    return max_points


class ViewReads:
    def _rows(self, sql: str, **parameters: Any) -> list[Row]:  # provided by StoreReader
        raise NotImplementedError

    # --- Training ----------------------------------------------------------------------------------------------

    def curve(self, run_id: str, since: datetime | None = None, until: datetime | None = None,
              max_points: int = DEFAULT_POINTS) -> list[Row]:
        """A run's step metrics in at most `max_points` buckets of consecutive steps, oldest first: per bucket its
        last step and time, the finite losses' mean/min/max, how many losses were NaN/±Inf, the last learning rate,
        mean and max grad norm, mean tokens/s."""
        max_points = _finite_points(max_points)
        time_sql, time_params = _between(since, until, "first_ts", "last_ts")
        span = self._rows(
            "SELECT sum(steps) AS n, min(first_step) AS lo, max(last_step) AS hi, min(bucket) AS lo_bucket, "
            f"max(bucket) AS hi_bucket FROM steps_100 WHERE run_id = {{run_id:String}} {time_sql}",
            run_id=run_id, **time_params)[0]
        if not span["n"]:
            return []
        if span["n"] <= max_points * RAW_ROWS_PER_POINT:
            time_sql, time_params = _between(since, until, "ts")
            width = math.ceil((span["hi"] - span["lo"] + 1) / max_points)
            rows = self._rows(Template(_CURVE_RAW).substitute(time=time_sql), run_id=run_id, lo=span["lo"], width=width,
                              **time_params)
        else:
            width = math.ceil((span["hi_bucket"] - span["lo_bucket"] + 1) / max_points)
            rows = self._rows(Template(_CURVE_ROLLUP).substitute(time=time_sql), run_id=run_id, lo=span["lo_bucket"],
                              width=width, **time_params)
        for row in rows:
            del row["b"]
        return rows

    def progress(self, run_id: str) -> Row | None:
        """Where a run is: its state (as `fleet` reports it), its recent pace in steps/s and, while it runs, the
        estimated seconds to its planned last step."""
        runs = self._fleet(run_id=run_id)
        if not runs:
            return None
        run = runs[0]
        recent = self._rows(
            "SELECT min(step) AS first_step, max(step) AS last_step, min(ts) AS first_ts, max(ts) AS last_ts "
            "FROM (SELECT step, ts FROM steps WHERE run_id = {run_id:String} ORDER BY seq DESC LIMIT 200)",
            run_id=run_id)[0]
        seconds = (_seconds(recent["last_ts"]) - _seconds(recent["first_ts"])) if recent["last_step"] else 0.0
        pace = (recent["last_step"] - recent["first_step"]) / seconds if seconds > 0 else None
        remaining = (run["total_steps"] or 0) - (run["last_step"] or 0)
        eta = remaining / pace if pace and run["status"] == "running" and remaining > 0 else None
        return {**run, "steps_per_s": pace, "eta_s": eta}

    # --- Fleet -------------------------------------------------------------------------------------------------

    def fleet(self, since: datetime | None = None) -> list[Row]:
        """Runs still running or heard from since `since` (all runs when None), most urgent first (`urgency`:
        URGENT_ALERT … SETTLED), then the most recently heard from: identity, status, last step and event, firing
        incidents and their rules (how many are block or critical, the most severe firing severity), and the latest
        gate evaluation's outcome (`gates`: passed, warnings or blocked; None before any)."""
        sql, params = self._fleet_sql(since=since)
        return self._rows(sql, **params)

    def fleet_page(self, since: datetime | None = None, search: str = "", offset: int = 0, limit: int = FLEET_PAGE,
                   quiet_seconds: float = 60.0, silenced_by: list[tuple[str, str, str]] | None = None) -> Row:
        """One page of `fleet` (`runs`: at most `limit` rows from `offset`, in its order, each saying whether it is
        `quiet`: running but silent for `quiet_seconds`) and what every run it was cut from adds up to (`summary`:
        runs, running, quiet, urgent — a firing block or critical alert —, firing alerts, and silenced, matched by
        one of the `silenced_by` (run id, experiment, host) matchers, '' matching any). With `search`, only the runs
        where every whitespace-separated term is found, ignoring case, in the id, name, experiment, team, host, user
        or status. A fleet of 10,000 runs costs a page's rows, not the fleet's."""
        sql, params = self._fleet_sql(since=since, terms=search.split())
        params |= {"quiet_before": bind_utc(datetime.now(timezone.utc) - timedelta(seconds=quiet_seconds)),
                   "silenced_by": list(silenced_by or [])}
        runs = self._rows(Template(_FLEET_PAGE).substitute(fleet=sql), limit=limit, offset=offset, **params)
        if not runs:  # past the last page: the totals alone
            return {"runs": [], "summary": self._rows(Template(_FLEET_SUMMARY).substitute(fleet=sql), **params)[0]}
        summary = {name: runs[0][f"total_{name}"] for name in _FLEET_TOTALS}
        for run in runs:
            for name in _FLEET_TOTALS:
                del run[f"total_{name}"]
        return {"runs": runs, "summary": summary}

    def _fleet(self, run_id: str | None = None, run_ids: list[str] | None = None) -> list[Row]:
        sql, params = self._fleet_sql(run_id=run_id, run_ids=run_ids)
        return self._rows(sql, **params)

    @staticmethod
    def _fleet_sql(since: datetime | None = None, run_id: str | None = None, run_ids: list[str] | None = None,
                   terms: list[str] | None = None) -> tuple[str, dict[str, Any]]:
        params: dict[str, Any] = {}
        run_filter = alert_filter = since_filter = search_filter = ""
        if run_id is not None:
            run_filter = alert_filter = "WHERE run_id = {run_id:String}"
            params["run_id"] = run_id
        elif run_ids is not None:
            run_filter = alert_filter = "WHERE has({run_ids:Array(String)}, run_id)"
            params["run_ids"] = list(run_ids)
        if since is not None:
            since_filter = "AND (st = 'running' OR seen >= {since:DateTime64(3, 'UTC')})"
            params["since"] = bind_utc(since)
        if terms:
            search_filter = _FLEET_SEARCH
            params["terms"] = terms
        return Template(_FLEET).substitute(run_filter=run_filter, alert_filter=alert_filter, since_filter=since_filter,
                                           search_filter=search_filter), params

    def runs_digest(self) -> Row:
        """How many runs there are, how many run, the newest start: changes whenever the run listing does."""
        return self._rows(
            "SELECT count() AS runs, countIf(st = 'running') AS running, max(started) AS newest "
            "FROM (SELECT run_id, max(started_at) AS started, argMaxMerge(status) AS st FROM runs GROUP BY run_id "
            "HAVING started > toDateTime64(0, 3, 'UTC'))")[0]

    # --- Resources ---------------------------------------------------------------------------------------------

    def _time_series(self, raw_sql: str, rollup_sql: str, rollup_table: str, where: str, params: dict[str, Any],
                     since: datetime | None, until: datetime | None, max_points: int) -> list[Row]:
        """Rows of `raw_sql` in buckets of a few seconds, or of `rollup_sql` (its per-minute rollup) once a bucket
        spans a minute or more; at most `max_points` buckets per series over [since, until]."""
        minute_sql, minute_params = _between(since, until, "minute")
        first, last = since, until
        if first is None or last is None:  # an open end is as far as the data goes
            span = self._rows(f"SELECT min(minute) AS lo, max(minute) AS hi, count() AS n FROM {rollup_table} "
                              f"WHERE {where}{minute_sql}", **params, **minute_params)[0]
            if not span["n"]:
                return []
            first, last = first or span["lo"], last or span["hi"]
        seconds = max(0.0, _seconds(last) - _seconds(first)) + ROLLUP_SECONDS
        width = max(1, math.ceil(seconds / _finite_points(max_points)))
        if width >= ROLLUP_SECONDS:
            width = math.ceil(width / ROLLUP_SECONDS) * ROLLUP_SECONDS
            return self._rows(Template(rollup_sql).substitute(where=where + minute_sql), width=width, **params,
                              **minute_params)
        time_sql, time_params = _between(since, until, "ts")
        return self._rows(Template(raw_sql).substitute(where=where + time_sql), width=width, **params, **time_params)

    def gpu_series(self, run_id: str | None = None, host: str | None = None, since: datetime | None = None,
                   until: datetime | None = None, max_points: int = 300) -> list[Row]:
        """Per host and GPU index, its samples in time buckets (at most `max_points` per GPU): mean utilisation %,
        peak memory used/total MB, peak temperature °C, mean power W."""
        where, params = "1", {}
        if run_id is not None:
            where += " AND run_id = {run_id:String}"
            params["run_id"] = run_id
        if host is not None:
            where += " AND host = {host:String}"
            params["host"] = host
        return self._time_series(_GPU_RAW, _GPU_ROLLUP, "gpu_1m", where, params, since, until, max_points)

    def gpus_seen(self, run_id: str) -> list[Row]:
        """The GPUs a run's samples came from (kept 30 days, migration 001), by host and index: name, UUID, memory
        total MB, when first and last sampled. Hardware as observed, where the run started recorded none."""
        return self._rows(
            "SELECT host, gpu_index, any(gpu_name) AS gpu_name, any(gpu_uuid) AS gpu_uuid, "
            "max(memory_total_mb) AS memory_total_mb, min(ts) AS first_seen, max(ts) AS last_seen "
            "FROM gpu_samples FINAL WHERE run_id = {run_id:String} GROUP BY host, gpu_index ORDER BY host, gpu_index",
            run_id=run_id)

    def throughput(self, run_id: str | None = None, host: str | None = None, since: datetime | None = None,
                   until: datetime | None = None, max_points: int = 300) -> list[Row]:
        """Per run, mean tokens/s in time buckets (at most `max_points` per run), with steps logged per bucket."""
        where, params = "1", {}
        if run_id is not None:
            where += " AND run_id = {run_id:String}"
            params["run_id"] = run_id
        if host is not None:
            where += " AND run_id IN (SELECT run_id FROM runs GROUP BY run_id HAVING max(host) = {host:String})"
            params["host"] = host
        return self._time_series(_THROUGHPUT_RAW, _THROUGHPUT_ROLLUP, "steps_1m", where, params, since, until,
                                 max_points)

    # --- Experiment comparison -----------------------------------------------------------------------------------

    def compare(self, run_ids: list[str], since: datetime | None = None, until: datetime | None = None,
                max_points: int = 300) -> Row:
        """The chosen runs side by side: `runs` (identity, status, last logged loss — NaN for a run that ended on
        one — and parameters of each: its hyperparameters and, where recorded, its seeds, which change a run as
        much), `differing` (the parameter names whose values are not all equal) and `curves` (each run's `curve`,
        run id added)."""
        seeds = ", ".join(f"argMax({name}, seq) AS {name}" for name in SEED_FIELDS)
        runs = self._rows(
            f"SELECT run_id, experiment, run_name, argMax(hyperparameters_json, seq) AS hyperparameters_json, {seeds} "
            "FROM run_started FINAL WHERE has({run_ids:Array(String)}, run_id) GROUP BY run_id, experiment, run_name",
            run_ids=list(run_ids))
        order = {run_id: i for i, run_id in enumerate(run_ids)}
        runs.sort(key=lambda r: order[r["run_id"]])
        state = {row["run_id"]: row for row in self._fleet(run_ids=list(run_ids))}
        for run in runs:
            try:
                run["hyperparameters"] = json.loads(run.pop("hyperparameters_json") or "{}")
            except ValueError:
                run["hyperparameters"] = {}
            recorded = {name: run.pop(name) for name in SEED_FIELDS}
            run["hyperparameters"] |= {name: value for name, value in recorded.items()
                                       if value is not None and name not in run["hyperparameters"]}
            run["status"] = state.get(run["run_id"], {}).get("status")
            run["last_loss"] = state.get(run["run_id"], {}).get("last_loss")
        names = sorted({name for run in runs for name in run["hyperparameters"]})
        missing = object()
        differing = [name for name in names
                     if len({json.dumps(r["hyperparameters"].get(name, missing), sort_keys=True, default=str)
                             for r in runs}) > 1]
        curves = [{"run_id": run["run_id"], **point} for run in runs
                  for point in self.curve(run["run_id"], since, until, max_points)]
        return {"runs": runs, "differing": differing, "curves": curves}

    # --- Alerts ------------------------------------------------------------------------------------------------

    def alert_incidents(self, run_ids: list[str] | None = None, rules: list[str] | None = None,
                        severities: list[str] | None = None, teams: list[str] | None = None,
                        states: list[str] | None = None, since: datetime | None = None,
                        until: datetime | None = None, limit: int = 1000, offset: int = 0) -> list[Row]:
        """Alert incidents (one per run, rule and dedup key) active at some time in [since, until], newest first,
        each with its latest state, at most `limit` from `offset`; an empty or None filter keeps every value."""
        sql, params = _incidents_sql(run_ids, rules, severities, teams, states, since, until)
        return self._rows(f"{sql} ORDER BY fired_at DESC, run_id, rule LIMIT {{limit:UInt32}} OFFSET {{offset:UInt32}} "
                          "SETTINGS prefer_column_name_to_alias = 1", limit=limit, offset=offset, **params)

    def alert_incident_counts(self, run_ids: list[str] | None = None, rules: list[str] | None = None,
                              severities: list[str] | None = None, teams: list[str] | None = None,
                              states: list[str] | None = None, since: datetime | None = None,
                              until: datetime | None = None) -> Row:
        """How many incidents `alert_incidents` holds with the same filters, however many its pages show, and how
        many of them are firing."""
        sql, params = _incidents_sql(run_ids, rules, severities, teams, states, since, until)
        return self._rows(f"SELECT count() AS incidents, countIf(state = 'firing') AS firing FROM ({sql}) "
                          "SETTINGS prefer_column_name_to_alias = 1", **params)[0]

    def alert_facets(self) -> Row:
        """The values the alert filters offer: rules, severities and teams that have fired, and runs with alerts."""
        return self._rows(
            "SELECT arraySort(groupUniqArray(rule)) AS rules, arraySort(groupUniqArray(severity)) AS severities, "
            "arraySort(groupUniqArray(team)) AS teams, arraySort(groupUniqArray(run_id)) AS run_ids FROM alerts")[0]
