"""Avro single-object encoding of trainwire events (the Avro specification's format).

A message is `C3 01` + the 8-byte CRC-64-AVRO fingerprint of the writer schema + the Avro binary body. The
fingerprint names the exact writer schema, so a consumer built on other schema versions resolves the
body against its own (reader) version; see docs/schema-evolution.md.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from functools import cache
from typing import NamedTuple, Protocol, get_args
from importlib import resources

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form
from pydantic import BaseModel, ValidationError

from .events import EVENT_TYPES

MAGIC = b"\xc3\x01"
HEADER_LEN = len(MAGIC) + 8
_FILE_NAME = re.compile(r"^(?P<kind>[a-z_]+)\.v(?P<version>\d+)\.avsc$")


class SchemaError(ValueError):
    """A payload that cannot become a valid event. The consumer dead-letters it and goes on."""


class CodecUnavailableError(RuntimeError):
    """The codec needs a service that is unreachable (a schema registry): retry later, the payload may be fine."""


class UnknownSchemaError(SchemaError):
    pass


class CorruptPayloadError(SchemaError):
    pass


class InvalidEventError(SchemaError):
    pass


@dataclass(frozen=True)
class SchemaVersion:
    kind: str
    version: int
    parsed: dict
    fingerprint: bytes


@cache
def registry() -> dict[bytes, SchemaVersion]:
    """Every schema version shipped in `schemas/avro`, by fingerprint."""
    found: dict[bytes, SchemaVersion] = {}
    for entry in resources.files(__package__).joinpath("avro").iterdir():
        match = _FILE_NAME.match(entry.name)
        if not match:
            continue
        parsed = fastavro.parse_schema(json.loads(entry.read_text()))
        fp = bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))
        found[fp] = SchemaVersion(match["kind"], int(match["version"]), parsed, fp)
    return found


@cache
def latest(kind: str) -> SchemaVersion:
    versions = [v for v in registry().values() if v.kind == kind]
    if not versions:
        raise UnknownSchemaError(f"no schema for event kind {kind!r}")
    return max(versions, key=lambda v: v.version)


class Writer(NamedTuple):
    """What a message's header says of its body, for decoding a batch's bodies together (consumers/frames.py)."""

    group_key: bytes  # the CRC-64-AVRO fingerprint of the writer schema: messages alike in it share one parse
    kind: str
    schema_json: str  # the writer schema, Avro parsing canonical form
    header_len: int  # the body starts after this many bytes of the message, which alone decide the writer


class Codec(Protocol):
    """How events become message bytes and back; chosen per deployment (see trainwire.infra.codecs)."""

    def encode(self, event: BaseModel) -> bytes: ...

    def decode_record(self, data: bytes) -> tuple[str, dict]: ...

    def writer_of(self, data: bytes) -> Writer:
        """The writer of a message from its header alone; raises what `decode_record` raises for a bad header."""
        ...


class SingleObjectCodec:
    """The default: Avro single-object encoding, writer schemas resolved from the files in `schemas/avro`."""

    def encode(self, event: BaseModel) -> bytes:
        return encode(event)

    def decode_record(self, data: bytes) -> tuple[str, dict]:
        return decode_record(data)

    def writer_of(self, data: bytes) -> Writer:
        writer = _writers().get(data[2:HEADER_LEN]) if data[:2] == MAGIC else None
        return writer if writer is not None else _writers()[_writer_version(data).fingerprint]  # else it raises


def _holds_models(annotation: object) -> bool:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return True
    return any(_holds_models(arg) for arg in get_args(annotation))


@cache
def _is_flat(model: type[BaseModel]) -> bool:
    """True when no field holds a nested model, so the instance's own field dict is the Avro record."""
    return not any(_holds_models(field.annotation) for field in model.model_fields.values())


def encode(event: BaseModel) -> bytes:
    schema = latest(type(event).kind)
    out = io.BytesIO()
    out.write(MAGIC)
    out.write(schema.fingerprint)
    record = event.__dict__ if _is_flat(type(event)) else event.model_dump()  # model_dump costs ~5 µs/event
    fastavro.schemaless_writer(out, schema.parsed, record)
    return out.getvalue()


def _writer_version(data: bytes) -> SchemaVersion:
    """The shipped schema a single-object message names, or the SchemaError its header deserves."""
    if len(data) < HEADER_LEN or data[:2] != MAGIC:
        raise CorruptPayloadError(f"not an Avro single-object message (first bytes {data[:HEADER_LEN].hex() or 'none'})")
    writer = registry().get(data[2:HEADER_LEN])
    if writer is None:
        raise UnknownSchemaError(f"unknown schema fingerprint {data[2:HEADER_LEN].hex()}")
    return writer


@cache
def _writers() -> dict[bytes, Writer]:
    """One Writer per shipped schema, made once: `writer_of` runs per message."""
    return {fp: Writer(fp, version.kind, to_parsing_canonical_form(version.parsed), HEADER_LEN)
            for fp, version in registry().items()}


def decode_record(data: bytes) -> tuple[str, dict]:
    """Decode to (kind, plain dict) resolved against the newest reader schema, without validation."""
    writer = _writer_version(data)
    reader = latest(writer.kind)
    body = io.BytesIO(data)
    body.seek(HEADER_LEN)
    try:
        # Schema resolution costs ~40% of a decode: skip it when the message was written with the newest version.
        record = fastavro.schemaless_reader(body, writer.parsed, None if reader is writer else reader.parsed)
    except Exception as err:  # fastavro raises EOFError, UnicodeDecodeError, IndexError, … on corrupt bodies
        raise CorruptPayloadError(f"corrupt {writer.kind} v{writer.version} body: {err!r}") from err
    if body.tell() != len(data):
        raise CorruptPayloadError(f"{len(data) - body.tell()} trailing bytes after a {writer.kind} body")
    return writer.kind, record


def validate(kind: str, record: dict) -> BaseModel:
    """The pydantic event for a decoded record, or InvalidEventError naming each bad field."""
    try:
        return EVENT_TYPES[kind].model_validate(record)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise InvalidEventError(f"invalid {kind} event: {problems}") from err


def decode(data: bytes, codec: Codec | None = None) -> BaseModel:
    """Decode and validate one message into its pydantic event model."""
    return validate(*(codec or SingleObjectCodec()).decode_record(data))
