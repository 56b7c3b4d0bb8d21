-- heartbeat v2 and run_ended v2 (schemas/avro/*.v2.avsc): what the producer lost of a run — events dropped (queue
-- full, transport refused), events refused as invalid, events still in the disk spool and the spool's size.
-- Rows from v1 writers read NULL (unknown), as the Avro reader fills in the fields' defaults.

ALTER TABLE heartbeats
    ADD COLUMN IF NOT EXISTS events_dropped Nullable(UInt64),
    ADD COLUMN IF NOT EXISTS events_invalid Nullable(UInt64),
    ADD COLUMN IF NOT EXISTS events_spooled Nullable(UInt64),
    ADD COLUMN IF NOT EXISTS spool_bytes Nullable(UInt64);

ALTER TABLE run_ended
    ADD COLUMN IF NOT EXISTS events_dropped Nullable(UInt64),
    ADD COLUMN IF NOT EXISTS events_invalid Nullable(UInt64),
    ADD COLUMN IF NOT EXISTS events_spooled Nullable(UInt64),
    ADD COLUMN IF NOT EXISTS spool_bytes Nullable(UInt64);
