"""The contract between every stage: Avro schemas, pydantic event models and the codec."""

from .codec import (
    CorruptPayloadError,
    InvalidEventError,
    SchemaError,
    UnknownSchemaError,
    decode,
    decode_record,
    encode,
)
from .events import (
    EVENT_TYPES,
    Alert,
    Checkpoint,
    Eval,
    Event,
    FileDigest,
    GpuSample,
    Heartbeat,
    RunEnded,
    RunStarted,
    Step,
)

__all__ = [
    "EVENT_TYPES", "Alert", "Checkpoint", "CorruptPayloadError", "Eval", "Event", "FileDigest", "GpuSample",
    "Heartbeat", "InvalidEventError", "RunEnded", "RunStarted", "SchemaError", "Step", "UnknownSchemaError",
    "decode", "decode_record", "encode",
]
