-- Rollups for long-range views (spec §8) and `runs`, each run's latest state, all kept by materialized views.
-- The views aggregate what is inserted; the ingest writer never inserts an event already stored (see
-- consumers/writer.py), so sums and counts here agree with the de-duplicated raw tables.
-- Losses that are NaN/±Inf are counted apart, never summed: one NaN must not hide a minute's average.
-- Rollups have no TTL: they are what a year of history is read from after raw rows expire (a row per run-minute).

CREATE TABLE IF NOT EXISTS steps_1m (
    run_id String, experiment SimpleAggregateFunction(max, LowCardinality(String)), minute DateTime('UTC'),
    steps SimpleAggregateFunction(sum, UInt64),
    first_step SimpleAggregateFunction(min, UInt64), last_step SimpleAggregateFunction(max, UInt64),
    loss_sum SimpleAggregateFunction(sum, Float64), loss_count SimpleAggregateFunction(sum, UInt64),
    loss_min SimpleAggregateFunction(min, Nullable(Float64)), loss_max SimpleAggregateFunction(max, Nullable(Float64)),
    loss_not_finite SimpleAggregateFunction(sum, UInt64),
    loss_last AggregateFunction(argMax, Nullable(Float64), UInt64),
    learning_rate_last AggregateFunction(argMax, Nullable(Float64), UInt64),
    grad_norm_sum SimpleAggregateFunction(sum, Float64), grad_norm_count SimpleAggregateFunction(sum, UInt64),
    grad_norm_max SimpleAggregateFunction(max, Nullable(Float64)),
    tokens_per_s_sum SimpleAggregateFunction(sum, Float64), tokens_per_s_count SimpleAggregateFunction(sum, UInt64)
) ENGINE = AggregatingMergeTree PARTITION BY toYYYYMM(minute) ORDER BY (run_id, minute);

CREATE TABLE IF NOT EXISTS steps_100 (
    run_id String, experiment SimpleAggregateFunction(max, LowCardinality(String)), bucket UInt64,
    first_ts SimpleAggregateFunction(min, DateTime64(3, 'UTC')), last_ts SimpleAggregateFunction(max, DateTime64(3, 'UTC')),
    steps SimpleAggregateFunction(sum, UInt64),
    first_step SimpleAggregateFunction(min, UInt64), last_step SimpleAggregateFunction(max, UInt64),
    loss_sum SimpleAggregateFunction(sum, Float64), loss_count SimpleAggregateFunction(sum, UInt64),
    loss_min SimpleAggregateFunction(min, Nullable(Float64)), loss_max SimpleAggregateFunction(max, Nullable(Float64)),
    loss_not_finite SimpleAggregateFunction(sum, UInt64),
    loss_last AggregateFunction(argMax, Nullable(Float64), UInt64),
    learning_rate_last AggregateFunction(argMax, Nullable(Float64), UInt64),
    grad_norm_sum SimpleAggregateFunction(sum, Float64), grad_norm_count SimpleAggregateFunction(sum, UInt64),
    grad_norm_max SimpleAggregateFunction(max, Nullable(Float64)),
    tokens_per_s_sum SimpleAggregateFunction(sum, Float64), tokens_per_s_count SimpleAggregateFunction(sum, UInt64)
) ENGINE = AggregatingMergeTree ORDER BY (run_id, bucket);

CREATE MATERIALIZED VIEW IF NOT EXISTS steps_1m_mv TO steps_1m AS
SELECT run_id, max(experiment) AS experiment, toStartOfMinute(ts) AS minute,
       count() AS steps, min(step) AS first_step, max(step) AS last_step,
       sumIf(assumeNotNull(loss), isFinite(assumeNotNull(loss)) AND isNotNull(loss)) AS loss_sum,
       countIf(isFinite(assumeNotNull(loss)) AND isNotNull(loss)) AS loss_count,
       minIfOrNull(assumeNotNull(loss), isFinite(assumeNotNull(loss)) AND isNotNull(loss)) AS loss_min,
       maxIfOrNull(assumeNotNull(loss), isFinite(assumeNotNull(loss)) AND isNotNull(loss)) AS loss_max,
       countIf(NOT isFinite(assumeNotNull(loss)) AND isNotNull(loss)) AS loss_not_finite,
       argMaxState(loss, step) AS loss_last, argMaxState(learning_rate, step) AS learning_rate_last,
       sumIf(assumeNotNull(grad_norm), isFinite(assumeNotNull(grad_norm)) AND isNotNull(grad_norm)) AS grad_norm_sum,
       countIf(isFinite(assumeNotNull(grad_norm)) AND isNotNull(grad_norm)) AS grad_norm_count,
       maxIfOrNull(assumeNotNull(grad_norm), isFinite(assumeNotNull(grad_norm)) AND isNotNull(grad_norm)) AS grad_norm_max,
       sumIf(assumeNotNull(tokens_per_s), isNotNull(tokens_per_s)) AS tokens_per_s_sum,
       countIf(isNotNull(tokens_per_s)) AS tokens_per_s_count
FROM steps GROUP BY run_id, minute;

CREATE MATERIALIZED VIEW IF NOT EXISTS steps_100_mv TO steps_100 AS
SELECT run_id, max(experiment) AS experiment, intDiv(step, 100) AS bucket, min(ts) AS first_ts, max(ts) AS last_ts,
       count() AS steps, min(step) AS first_step, max(step) AS last_step,
       sumIf(assumeNotNull(loss), isFinite(assumeNotNull(loss)) AND isNotNull(loss)) AS loss_sum,
       countIf(isFinite(assumeNotNull(loss)) AND isNotNull(loss)) AS loss_count,
       minIfOrNull(assumeNotNull(loss), isFinite(assumeNotNull(loss)) AND isNotNull(loss)) AS loss_min,
       maxIfOrNull(assumeNotNull(loss), isFinite(assumeNotNull(loss)) AND isNotNull(loss)) AS loss_max,
       countIf(NOT isFinite(assumeNotNull(loss)) AND isNotNull(loss)) AS loss_not_finite,
       argMaxState(loss, step) AS loss_last, argMaxState(learning_rate, step) AS learning_rate_last,
       sumIf(assumeNotNull(grad_norm), isFinite(assumeNotNull(grad_norm)) AND isNotNull(grad_norm)) AS grad_norm_sum,
       countIf(isFinite(assumeNotNull(grad_norm)) AND isNotNull(grad_norm)) AS grad_norm_count,
       maxIfOrNull(assumeNotNull(grad_norm), isFinite(assumeNotNull(grad_norm)) AND isNotNull(grad_norm)) AS grad_norm_max,
       sumIf(assumeNotNull(tokens_per_s), isNotNull(tokens_per_s)) AS tokens_per_s_sum,
       countIf(isNotNull(tokens_per_s)) AS tokens_per_s_count
FROM steps GROUP BY run_id, bucket;

CREATE TABLE IF NOT EXISTS gpu_1m (
    run_id String, host LowCardinality(String), rank UInt16, gpu_index UInt16, minute DateTime('UTC'),
    samples SimpleAggregateFunction(sum, UInt64),
    utilization_sum SimpleAggregateFunction(sum, Float64), utilization_count SimpleAggregateFunction(sum, UInt64),
    utilization_min SimpleAggregateFunction(min, Nullable(Float64)),
    memory_used_max SimpleAggregateFunction(max, Nullable(Float64)), memory_total_max SimpleAggregateFunction(max, Nullable(Float64)),
    temperature_max SimpleAggregateFunction(max, Nullable(Float64)),
    power_sum SimpleAggregateFunction(sum, Float64), power_count SimpleAggregateFunction(sum, UInt64)
) ENGINE = AggregatingMergeTree PARTITION BY toYYYYMM(minute) ORDER BY (run_id, host, rank, gpu_index, minute);

CREATE MATERIALIZED VIEW IF NOT EXISTS gpu_1m_mv TO gpu_1m AS
SELECT run_id, host, rank, gpu_index, toStartOfMinute(ts) AS minute, count() AS samples,
       sumIf(assumeNotNull(utilization_pct), isNotNull(utilization_pct)) AS utilization_sum,
       countIf(isNotNull(utilization_pct)) AS utilization_count,
       minIfOrNull(assumeNotNull(utilization_pct), isNotNull(utilization_pct)) AS utilization_min,
       maxIfOrNull(assumeNotNull(memory_used_mb), isNotNull(memory_used_mb)) AS memory_used_max,
       maxIfOrNull(assumeNotNull(memory_total_mb), isNotNull(memory_total_mb)) AS memory_total_max,
       maxIfOrNull(assumeNotNull(temperature_c), isNotNull(temperature_c)) AS temperature_max,
       sumIf(assumeNotNull(power_w), isNotNull(power_w)) AS power_sum, countIf(isNotNull(power_w)) AS power_count
FROM gpu_samples GROUP BY run_id, host, rank, gpu_index, minute;

-- Each run's latest state, permanent (spec §8). Every column is an aggregate that several views feed; a view
-- leaves the columns it does not know at their defaults, which the aggregates ignore (max of '' and a name, etc.).
CREATE TABLE IF NOT EXISTS runs (
    run_id String,
    experiment SimpleAggregateFunction(max, LowCardinality(String)),
    run_name SimpleAggregateFunction(max, String), team SimpleAggregateFunction(max, LowCardinality(String)),
    host SimpleAggregateFunction(max, LowCardinality(String)), user SimpleAggregateFunction(max, String),
    started_at SimpleAggregateFunction(max, DateTime64(3, 'UTC')),
    total_steps SimpleAggregateFunction(max, UInt64),
    ended_at SimpleAggregateFunction(max, DateTime64(3, 'UTC')),
    status AggregateFunction(argMax, String, DateTime64(3, 'UTC')),
    final_loss AggregateFunction(argMax, Nullable(Float64), DateTime64(3, 'UTC')),
    steps_logged SimpleAggregateFunction(sum, UInt64),
    last_step SimpleAggregateFunction(max, UInt64),
    last_loss AggregateFunction(argMax, Nullable(Float64), UInt64),
    last_event_at SimpleAggregateFunction(max, DateTime64(3, 'UTC'))
) ENGINE = AggregatingMergeTree ORDER BY run_id;

CREATE MATERIALIZED VIEW IF NOT EXISTS runs_started_mv TO runs AS
SELECT run_id, max(experiment) AS experiment, max(run_name) AS run_name, max(team) AS team, max(host) AS host,
       max(user) AS user, max(ts) AS started_at, max(ifNull(total_steps, 0)) AS total_steps,
       argMaxState('running', toDateTime64(0, 3, 'UTC')) AS status, max(ts) AS last_event_at
FROM run_started GROUP BY run_id;

CREATE MATERIALIZED VIEW IF NOT EXISTS runs_steps_mv TO runs AS
SELECT run_id, count() AS steps_logged, max(step) AS last_step, argMaxState(loss, step) AS last_loss,
       max(ts) AS last_event_at
FROM steps GROUP BY run_id;

CREATE MATERIALIZED VIEW IF NOT EXISTS runs_heartbeats_mv TO runs AS
SELECT run_id, max(ts) AS last_event_at FROM heartbeats GROUP BY run_id;

CREATE MATERIALIZED VIEW IF NOT EXISTS runs_ended_mv TO runs AS
SELECT run_id, max(ts) AS ended_at, argMaxState(status, ts) AS status, argMaxState(final_loss, ts) AS final_loss,
       max(ts) AS last_event_at
FROM run_ended GROUP BY run_id;

-- Backfill: re-inserting what is stored feeds the views once with every event stored before they existed; the
-- raw tables collapse the re-inserted rows into the originals (ReplacingMergeTree on the event's identity).
INSERT INTO run_started SELECT * FROM run_started FINAL;
INSERT INTO steps SELECT * FROM steps FINAL;
INSERT INTO heartbeats SELECT * FROM heartbeats FINAL;
INSERT INTO run_ended SELECT * FROM run_ended FINAL;
INSERT INTO gpu_samples SELECT * FROM gpu_samples FINAL;
