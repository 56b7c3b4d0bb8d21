"""Confluent Schema Registry wire format: `00` + 4-byte big-endian schema id + the Avro binary body.

Chosen per deployment by `TRAINWIRE_SCHEMA_REGISTRY` (see trainwire.infra.codecs). Each event kind's newest
`.avsc` is registered under its own subject, the record's full name (Confluent's RecordNameStrategy:
several kinds share one topic), e.g. `dev.trainwire.events.Step`. Ids are cached both ways, so the registry is
asked once per kind when encoding and once per schema id when decoding; the body is written and read with
fastavro against the shipped reader schema, exactly as the single-object codec does.

`decode_record` also reads single-object messages (`C3 01` …) so a deployment can switch formats with both
kinds of message in flight. A registry that cannot be reached raises RegistryUnavailableError, which is not a
SchemaError: the message is fine, so a consumer must retry it rather than dead-letter it.
"""

from __future__ import annotations

import io
import json
from functools import cache
from importlib import resources
from urllib.parse import urlsplit, urlunsplit

import fastavro
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError
from fastavro.schema import fingerprint, to_parsing_canonical_form
from pydantic import BaseModel

from .codec import (
    CodecUnavailableError,
    MAGIC as SINGLE_OBJECT_MAGIC,
    CorruptPayloadError,
    InvalidEventError,
    SingleObjectCodec,
    UnknownSchemaError,
    Writer,
    latest,
    registry,
)

MAGIC = b"\x00"
HEADER_LEN = 5
# A registry that hangs must not stall a producer or consumer for long: bounded time, few retries.
DEFAULT_CONF = {"timeout": 5, "max.retries": 2, "retries.wait.ms": 200, "retries.max.wait.ms": 2000}


class RegistryUnavailableError(CodecUnavailableError):
    """The schema registry could not answer (network, timeout, 5xx, auth). The message itself may be fine:
    retry later, never dead-letter it."""


@cache
def _shared_client(url: str) -> SchemaRegistryClient:
    """One client per URL per process; for `mock://` URLs that also means one in-memory registry, which every
    codec of the process (producers and the consumer of `trainwire demo`) sees."""
    return SchemaRegistryClient.new_client({"url": url, **DEFAULT_CONF})


@cache
def _kind_of_record() -> dict[str, str]:
    """Record full name (`dev.trainwire.events.Step`) → event kind, from the shipped schemas."""
    return {version.parsed["name"]: version.kind for version in registry().values()}


def subject_for(kind: str) -> str:
    """RecordNameStrategy: the full name of the kind's record."""
    return latest(kind).parsed["name"]


def _redact(url: str) -> str:
    """The URL without credentials, for messages."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


class ConfluentCodec:
    """Codec for the Confluent wire format; `client` overrides the shared client (e.g. other timeouts)."""

    def __init__(self, registry_url: str, *, client: SchemaRegistryClient | None = None,
                 auto_register: bool = True):
        self._url = _redact(registry_url)
        self._client = client or _shared_client(registry_url)
        self._auto_register = auto_register
        self._single_object = SingleObjectCodec()
        self._headers: dict[str, bytes] = {}  # kind → 00 + schema id of its newest schema
        self._readers: dict[int, tuple[str, dict, dict]] = {}  # schema id → (kind, writer, reader)
        self._writers: dict[int, Writer] = {}  # schema id → its Writer (writer_of)

    # -- encoding -------------------------------------------------------------------------------------------

    def encode(self, event: BaseModel) -> bytes:
        kind = type(event).kind
        header = self._headers.get(kind) or self._register(kind)
        out = io.BytesIO()
        out.write(header)
        try:
            fastavro.schemaless_writer(out, latest(kind).parsed, event.model_dump())
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise InvalidEventError(f"cannot encode {kind} event: {err!r}") from err
        return out.getvalue()

    def _register(self, kind: str) -> bytes:
        version = latest(kind)
        text = resources.files(__package__).joinpath("avro", f"{kind}.v{version.version}.avsc").read_text()
        schema = Schema(json.dumps(json.loads(text), separators=(",", ":")), "AVRO")
        subject = subject_for(kind)
        try:
            if self._auto_register:
                schema_id = self._client.register_schema(subject, schema)
            else:
                schema_id = self._client.lookup_schema(subject, schema).schema_id
        except SchemaRegistryError as err:
            if err.http_status_code in (404, 409, 422):  # not registered, incompatible, invalid: our schema's fault
                raise UnknownSchemaError(f"registry {self._url} refused {kind} v{version.version} "
                                         f"under subject {subject}: {err}") from err
            raise self._unavailable(f"registering subject {subject}", err) from err
        except Exception as err:  # transport errors (connection refused, timeouts, TLS), OAuth failures, …
            raise self._unavailable(f"registering subject {subject}", err) from err
        header = MAGIC + schema_id.to_bytes(4, "big")
        self._headers[kind] = header
        return header

    # -- decoding -------------------------------------------------------------------------------------------

    def decode_record(self, data: bytes) -> tuple[str, dict]:
        """(kind, plain dict) resolved against the newest shipped reader schema, without validation."""
        if data[:2] == SINGLE_OBJECT_MAGIC:
            return self._single_object.decode_record(data)
        schema_id = self._schema_id(data)
        kind, writer, reader = self._readers.get(schema_id) or self._resolve(schema_id)
        body = io.BytesIO(data)
        body.seek(HEADER_LEN)
        try:
            record = fastavro.schemaless_reader(body, writer, reader)
        except Exception as err:  # fastavro raises EOFError, UnicodeDecodeError, IndexError, … on corrupt bodies
            raise CorruptPayloadError(f"corrupt {kind} body (schema id {schema_id}): {err!r}") from err
        if body.tell() != len(data):
            raise CorruptPayloadError(f"{len(data) - body.tell()} trailing bytes after a {kind} body")
        return kind, record

    def writer_of(self, data: bytes) -> Writer:
        """The writer a message names, its schema fetched from the registry once per schema id (as decode_record
        does); single-object messages are answered by the single-object codec."""
        if data[:2] == SINGLE_OBJECT_MAGIC:
            return self._single_object.writer_of(data)
        schema_id = self._schema_id(data)
        writer = self._writers.get(schema_id)
        if writer is None:
            kind, schema, _ = self._readers.get(schema_id) or self._resolve(schema_id)
            canonical = to_parsing_canonical_form(schema)
            writer = Writer(bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO")), kind, canonical, HEADER_LEN)
            self._writers[schema_id] = writer
        return writer

    @staticmethod
    def _schema_id(data: bytes) -> int:
        if len(data) < HEADER_LEN or data[:1] != MAGIC:
            raise CorruptPayloadError(f"neither a Confluent (00 + schema id) nor an Avro single-object message "
                                      f"(first bytes {data[:HEADER_LEN].hex() or 'none'})")
        return int.from_bytes(data[1:HEADER_LEN], "big")

    def _resolve(self, schema_id: int) -> tuple[str, dict, dict]:
        try:
            schema = self._client.get_schema(schema_id)
        except SchemaRegistryError as err:
            if err.http_status_code == 404:
                raise UnknownSchemaError(f"unknown schema id {schema_id} in registry {self._url}") from err
            raise self._unavailable(f"fetching schema id {schema_id}", err) from err
        except Exception as err:  # transport errors (connection refused, timeouts, TLS), OAuth failures, …
            raise self._unavailable(f"fetching schema id {schema_id}", err) from err
        if (schema.schema_type or "AVRO") != "AVRO":
            raise UnknownSchemaError(f"schema id {schema_id} is a {schema.schema_type} schema, not Avro")
        try:
            writer = fastavro.parse_schema(json.loads(schema.schema_str))
            name = writer["name"] if isinstance(writer, dict) else None
        except Exception as err:  # JSON, SchemaParseException, UnknownType (references), …
            raise UnknownSchemaError(f"schema id {schema_id} does not parse as Avro: {err!r}") from err
        kind = _kind_of_record().get(name)
        if kind is None:
            raise UnknownSchemaError(f"schema id {schema_id} is record {name!r}, not a trainwire event")
        # A shipped version (the usual case) is read with its own parsed schema: no resolution work per message.
        shipped = registry().get(bytes.fromhex(fingerprint(to_parsing_canonical_form(writer), "CRC-64-AVRO")))
        resolved = (kind, shipped.parsed if shipped else writer, latest(kind).parsed)
        self._readers[schema_id] = resolved
        return resolved

    def _unavailable(self, doing: str, err: Exception) -> RegistryUnavailableError:
        return RegistryUnavailableError(f"schema registry {self._url} unavailable while {doing}: "
                                        f"{type(err).__name__}: {err}")
