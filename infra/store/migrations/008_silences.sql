-- Silences (docs/alerting.md): `trainwire alerts silence` keeps matching pages from being sent for a while. One row
-- per version of a silence (created, removed, noted as expired), the latest by `updated_at` kept; an empty matcher
-- matches everything, and a silence names at least one. Read by the alert consumer every few seconds and by the
-- dashboard. Permanent, like the audit log entries that record each change.
CREATE TABLE IF NOT EXISTS silences (
    silence_id String, run_id String, experiment String, rule String, host String,
    starts_at DateTime64(3, 'UTC'), ends_at DateTime64(3, 'UTC'), reason String,
    created_by String, created_at DateTime64(3, 'UTC'),
    removed_by String, removed_at Nullable(DateTime64(3, 'UTC')),
    expiry_noted Bool DEFAULT false, updated_at DateTime64(3, 'UTC')
) ENGINE = ReplacingMergeTree(updated_at) ORDER BY silence_id;
