-- checkpoint v2 (schemas/avro/checkpoint.v2.avsc): a checkpoint event with deleted = true marks a checkpoint the run
-- recorded earlier as gone from disk (rotated away by save_total_limit). Rows from v1 writers, and every checkpoint's
-- own record, read NULL.

ALTER TABLE checkpoints ADD COLUMN IF NOT EXISTS deleted Nullable(Bool);
