-- Event tables mirror the Avro schemas field for field (ts_ms becomes ts). ReplacingMergeTree on the event's
-- identity makes a redelivered event collapse into one row; queries that must count exactly read with FINAL.

CREATE TABLE IF NOT EXISTS run_started (
    event_id String, run_id String, experiment LowCardinality(String), team LowCardinality(String),
    host LowCardinality(String), seq UInt64, ts DateTime64(3, 'UTC'),
    run_name String, user LowCardinality(String), tags Map(String, String), hyperparameters_json String,
    config_file Nullable(String), config_sha256 Nullable(String), git_commit Nullable(String), git_dirty Nullable(Bool),
    base_model Nullable(String), base_model_source Nullable(String), base_model_revision Nullable(String),
    base_model_sha256 Nullable(String), dataset_path Nullable(String), dataset_version Nullable(String),
    dataset_sha256 Nullable(String), dataset_samples Nullable(UInt64), seed Nullable(Int64), data_seed Nullable(Int64),
    environment Map(String, String), gpu_type Nullable(String), gpu_count Nullable(UInt32),
    total_steps Nullable(UInt64), total_epochs Nullable(Float64)
) ENGINE = ReplacingMergeTree ORDER BY (run_id, seq);

CREATE TABLE IF NOT EXISTS steps (
    event_id String, run_id String, experiment LowCardinality(String), team LowCardinality(String),
    host LowCardinality(String), seq UInt64, ts DateTime64(3, 'UTC') CODEC(Delta, ZSTD),
    step UInt64 CODEC(Delta, ZSTD), epoch Nullable(Float64), loss Nullable(Float64) CODEC(Gorilla, ZSTD),
    learning_rate Nullable(Float64) CODEC(Gorilla, ZSTD), grad_norm Nullable(Float64) CODEC(Gorilla, ZSTD),
    tokens_per_s Nullable(Float64), samples_per_s Nullable(Float64), batch_time_s Nullable(Float64),
    tokens Nullable(UInt64), extra Map(String, Float64)
) ENGINE = ReplacingMergeTree PARTITION BY toDate(ts) ORDER BY (run_id, seq)
  TTL toDateTime(ts) + INTERVAL 90 DAY;

CREATE TABLE IF NOT EXISTS evals (
    event_id String, run_id String, experiment LowCardinality(String), team LowCardinality(String),
    host LowCardinality(String), seq UInt64, ts DateTime64(3, 'UTC'),
    step UInt64, epoch Nullable(Float64), eval_loss Nullable(Float64), eval_accuracy Nullable(Float64),
    perplexity Nullable(Float64), runtime_s Nullable(Float64), metrics Map(String, Float64)
) ENGINE = ReplacingMergeTree PARTITION BY toDate(ts) ORDER BY (run_id, seq)
  TTL toDateTime(ts) + INTERVAL 90 DAY;

CREATE TABLE IF NOT EXISTS gpu_samples (
    event_id String, run_id String, experiment LowCardinality(String), team LowCardinality(String),
    host LowCardinality(String), seq UInt64, ts DateTime64(3, 'UTC') CODEC(Delta, ZSTD),
    rank UInt16, gpu_index UInt16, gpu_uuid LowCardinality(String), gpu_name LowCardinality(String),
    utilization_pct Nullable(Float64), memory_used_mb Nullable(Float64), memory_total_mb Nullable(Float64),
    temperature_c Nullable(Float64), power_w Nullable(Float64), sm_clock_mhz Nullable(Float64),
    mem_clock_mhz Nullable(Float64)
) ENGINE = ReplacingMergeTree PARTITION BY toDate(ts) ORDER BY (run_id, host, rank, seq)
  TTL toDateTime(ts) + INTERVAL 30 DAY;

CREATE TABLE IF NOT EXISTS heartbeats (
    event_id String, run_id String, experiment LowCardinality(String), team LowCardinality(String),
    host LowCardinality(String), seq UInt64, ts DateTime64(3, 'UTC'), step Nullable(UInt64)
) ENGINE = ReplacingMergeTree PARTITION BY toDate(ts) ORDER BY (run_id, seq)
  TTL toDateTime(ts) + INTERVAL 30 DAY;

CREATE TABLE IF NOT EXISTS checkpoints (
    event_id String, run_id String, experiment LowCardinality(String), team LowCardinality(String),
    host LowCardinality(String), seq UInt64, ts DateTime64(3, 'UTC'),
    step UInt64, path String, files Array(Tuple(name String, size UInt64, sha256 String)),
    eval_loss Nullable(Float64), is_best Nullable(Bool)
) ENGINE = ReplacingMergeTree ORDER BY (run_id, seq);

CREATE TABLE IF NOT EXISTS run_ended (
    event_id String, run_id String, experiment LowCardinality(String), team LowCardinality(String),
    host LowCardinality(String), seq UInt64, ts DateTime64(3, 'UTC'),
    status LowCardinality(String), error Nullable(String), duration_s Nullable(Float64),
    completed_steps Nullable(UInt64), epochs Nullable(Float64), initial_loss Nullable(Float64),
    final_loss Nullable(Float64), best_eval_loss Nullable(Float64), best_checkpoint Nullable(String),
    artifacts Array(Tuple(name String, size UInt64, sha256 String))
) ENGINE = ReplacingMergeTree ORDER BY (run_id, seq);

CREATE TABLE IF NOT EXISTS alerts (
    event_id String, run_id String, experiment LowCardinality(String), team LowCardinality(String),
    ts DateTime64(3, 'UTC'), rule LowCardinality(String), severity LowCardinality(String),
    state LowCardinality(String), step Nullable(UInt64), value Nullable(Float64), threshold Nullable(Float64),
    message String, dedup_key String
) ENGINE = ReplacingMergeTree ORDER BY (run_id, rule, event_id);

CREATE TABLE IF NOT EXISTS dead_letters (
    ts DateTime64(3, 'UTC') DEFAULT now64(3), topic LowCardinality(String), partition UInt32, offset UInt64,
    reason String, payload String
) ENGINE = ReplacingMergeTree ORDER BY (topic, partition, offset);
