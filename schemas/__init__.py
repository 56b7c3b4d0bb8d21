"""The contract between every stage: Avro schemas, pydantic event models and the codec."""

from .codec import (
    Codec,
    CodecUnavailableError,
    CorruptPayloadError,
    InvalidEventError,
    SchemaError,
    SingleObjectCodec,
    UnknownSchemaError,
    decode,
    decode_record,
    encode,
    validate,
)
from .events import (
    EVENT_TYPES,
    STOP_ON_BLOCK_TAG,
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
    StopCommand,
)

__all__ = [
    "EVENT_TYPES", "Alert", "Checkpoint", "Codec", "CodecUnavailableError", "CorruptPayloadError", "Eval", "Event",
    "FileDigest", "GpuSample", "Heartbeat", "InvalidEventError", "RunEnded", "RunStarted", "SchemaError", "SingleObjectCodec", "Step",
    "STOP_ON_BLOCK_TAG", "StopCommand",
    "UnknownSchemaError", "decode", "decode_record", "encode", "validate",
]
