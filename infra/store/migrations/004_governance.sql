-- Governance (spec §5–§7): gate evaluations and the append-only audit log. Both are permanent (no TTL).

-- One row per evaluation of a run's quality gates, with what it was evaluated on: the gate verdicts, the
-- inputs (loss summary, final metrics, baseline) and the audit record G6 checked. `result_sha256` is also in the
-- evaluation's audit log entry, so an altered row no longer matches the chain.
CREATE TABLE IF NOT EXISTS gate_results (
    evaluation_id String, run_id String, evaluated_at DateTime64(3, 'UTC'), trigger LowCardinality(String),
    actor String, baseline String, overall LowCardinality(String), gates_json String, inputs_json String,
    audit_json String, result_sha256 String
) ENGINE = ReplacingMergeTree ORDER BY (run_id, evaluation_id);

-- The audit log: who accessed or changed what, registry transitions included, as a hash chain. Each entry's
-- `entry_hash` is the SHA-256 of its fields and the previous entry's hash. A plain MergeTree, never a
-- Replacing one: a second entry claiming a sequence number must stay visible to `trainwire audit verify`.
CREATE TABLE IF NOT EXISTS audit_log (
    seq UInt64, ts DateTime64(3, 'UTC'), actor String, action LowCardinality(String), run_id String,
    details String, prev_hash String, entry_hash String
) ENGINE = MergeTree ORDER BY seq;
