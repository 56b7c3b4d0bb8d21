-- The audit log proves itself (docs/governance.md): each entry is signed with an Ed25519 key the store never holds.
-- `key_id` names the public key (a fingerprint), `signature` is over the entry hash. Entries from before this
-- migration stay unsigned; verify accepts unsigned entries only before the first signed one.
ALTER TABLE audit_log ADD COLUMN IF NOT EXISTS key_id String DEFAULT '';
ALTER TABLE audit_log ADD COLUMN IF NOT EXISTS signature String DEFAULT '';

-- Claims on the next sequence number, so processes on different hosts appending to one server never both take
-- seq N: the first claim by the server's clock (then by claimant) appends. Only recent claims matter.
CREATE TABLE IF NOT EXISTS audit_claims (
    seq UInt64, claimant String, claimed_at DateTime64(9, 'UTC') DEFAULT now64(9)
) ENGINE = MergeTree ORDER BY (seq, claimed_at, claimant) TTL toDateTime(claimed_at) + INTERVAL 7 DAY;
