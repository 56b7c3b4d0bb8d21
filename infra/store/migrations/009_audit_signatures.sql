-- The audit log proves itself (docs/governance.md): each entry is signed with an Ed25519 key the store never holds.
-- `key_id` names the public key (a fingerprint), `signature` is over the entry hash. Entries from before this
-- migration stay unsigned; verify accepts unsigned entries only before the first signed one.
ALTER TABLE audit_log ADD COLUMN IF NOT EXISTS key_id String DEFAULT '';
ALTER TABLE audit_log ADD COLUMN IF NOT EXISTS signature String DEFAULT '';

-- One entry per sequence number, whoever appends: each append carries the deduplication token
-- `trainwire-audit-seq-<seq>`, and the store drops a second insert with a token among its last 1000, so two hosts
-- appending at once cannot both take seq N (the loser reads back another hash and retries on the new head).
-- Replicated tables deduplicate by default (replicated_deduplication_window).
ALTER TABLE audit_log MODIFY SETTING non_replicated_deduplication_window = 1000;
