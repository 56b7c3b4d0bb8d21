-- run_started v2 (schemas/avro/run_started.v2.avsc): dataset, seed, determinism, environment and hardware lineage.
-- Rows from v1 writers read these columns' defaults (NULL, or an empty array), as the Avro reader fills them in.

ALTER TABLE run_started
    ADD COLUMN IF NOT EXISTS dataset_source Nullable(String),
    ADD COLUMN IF NOT EXISTS dataset_license Nullable(String),
    ADD COLUMN IF NOT EXISTS dataset_format Nullable(String),
    ADD COLUMN IF NOT EXISTS dataset_preprocessing Array(String),
    ADD COLUMN IF NOT EXISTS numpy_seed Nullable(Int64),
    ADD COLUMN IF NOT EXISTS cudnn_deterministic Nullable(Bool),
    ADD COLUMN IF NOT EXISTS cudnn_benchmark Nullable(Bool),
    ADD COLUMN IF NOT EXISTS deterministic_algorithms Nullable(Bool),
    ADD COLUMN IF NOT EXISTS gpu_driver_version Nullable(String),
    ADD COLUMN IF NOT EXISTS cuda_version Nullable(String),
    ADD COLUMN IF NOT EXISTS container_image_digest Nullable(String),
    ADD COLUMN IF NOT EXISTS packages_sha256 Nullable(String),
    ADD COLUMN IF NOT EXISTS world_size Nullable(UInt32),
    ADD COLUMN IF NOT EXISTS adapter_json Nullable(String);
