-- Dead letters replayed by `trainwire dead-letters replay` (docs/dead-letters.md): one row per dead letter, keyed
-- like `dead_letters`, holding its latest replay; a replay skips a dead letter found here unless told `--again`.
-- Permanent, like the dead letters themselves.
CREATE TABLE IF NOT EXISTS dead_letter_replays (
    topic LowCardinality(String), partition UInt32, offset UInt64, replayed_at DateTime64(3, 'UTC'),
    replayed_by String
) ENGINE = ReplacingMergeTree(replayed_at) ORDER BY (topic, partition, offset);
