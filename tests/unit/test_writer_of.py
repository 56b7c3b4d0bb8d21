"""`writer_of`: what a message's header says of its body, for the columnar decoder. It answers from the header
alone, refuses exactly what `decode_record` refuses for a bad header, and names a writer schema by its fingerprint,
so the same schema groups alike in both wire formats."""

import io
import json
import socket

import fastavro
import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from fastavro.schema import fingerprint, to_parsing_canonical_form

from trainwire.schemas import CodecUnavailableError, Heartbeat, SchemaError, SingleObjectCodec, Step, encode
from trainwire.schemas.codec import HEADER_LEN, MAGIC, latest, registry
from trainwire.schemas.confluent import ConfluentCodec

STEP = Step(run_id="r", experiment="x", seq=1, step=1, loss=0.5)
BAD_HEADERS = [b"", b"\x07garbage", MAGIC, MAGIC + b"\x01" * 8 + b"\x00", b"\x00\x00\x01"]


@pytest.fixture
def client():
    return SchemaRegistryClient.new_client({"url": "mock://writer-of"})


@pytest.fixture
def confluent(client):
    return ConfluentCodec("mock://writer-of", client=client)


def old_message(kind: str, version: int) -> bytes:
    """A message written with an older shipped schema, every field at its default or zero."""
    (schema,) = [v for v in registry().values() if v.kind == kind and v.version == version]
    fields = {f["name"]: f.get("default", 0 if f["type"] == "long" else "x") for f in schema.parsed["fields"]}
    out = io.BytesIO(MAGIC + schema.fingerprint)
    out.seek(0, 2)
    fastavro.schemaless_writer(out, schema.parsed, fields)
    return out.getvalue()


def canonical_fingerprint(schema_json: str) -> bytes:
    return bytes.fromhex(fingerprint(schema_json, "CRC-64-AVRO"))


def test_a_single_object_message_names_its_shipped_schema():
    writer = SingleObjectCodec().writer_of(encode(STEP))
    assert (writer.kind, writer.header_len) == ("step", HEADER_LEN)
    assert writer.group_key == latest("step").fingerprint == canonical_fingerprint(writer.schema_json)
    assert json.loads(writer.schema_json) == json.loads(to_parsing_canonical_form(latest("step").parsed))


def test_an_older_version_is_its_own_writer():
    old, new = old_message("heartbeat", 1), encode(Heartbeat(run_id="r", experiment="x", seq=1))
    codec = SingleObjectCodec()
    assert codec.writer_of(old).kind == codec.writer_of(new).kind == "heartbeat"
    assert codec.writer_of(old).group_key != codec.writer_of(new).group_key
    assert "events_dropped" not in codec.writer_of(old).schema_json


@pytest.mark.parametrize("data", BAD_HEADERS)
def test_a_bad_header_is_refused_as_decode_record_refuses_it(data, confluent):
    for codec in (SingleObjectCodec(), confluent):
        with pytest.raises(Exception) as decoding:
            codec.decode_record(data)
        with pytest.raises(type(decoding.value)) as naming:
            codec.writer_of(data)
        assert str(naming.value) == str(decoding.value)


def test_a_body_is_not_read():
    """Only the header counts: a truncated body has the same writer (its parse will refuse it)."""
    message = encode(STEP)
    assert SingleObjectCodec().writer_of(message[:HEADER_LEN]) == SingleObjectCodec().writer_of(message)


def test_confluent_messages_group_with_single_object_messages_of_the_same_schema(confluent):
    by_id, single = confluent.writer_of(confluent.encode(STEP)), confluent.writer_of(encode(STEP))
    assert by_id.header_len == 5 and single.header_len == HEADER_LEN
    assert by_id.group_key == single.group_key and by_id.kind == "step"


def test_the_registry_is_asked_once_per_schema_id(client, monkeypatch):
    data = ConfluentCodec("mock://writer-of", client=client).encode(STEP)
    asked = []
    get_schema = client.get_schema
    monkeypatch.setattr(client, "get_schema", lambda *a, **k: asked.append(a) or get_schema(*a, **k))
    codec = ConfluentCodec("mock://writer-of", client=client)
    for _ in range(3):
        codec.writer_of(data)
    codec.decode_record(data)
    assert len(asked) == 1


def test_a_foreign_writer_of_a_trainwire_record_is_named_by_its_own_fingerprint(client, confluent):
    """A schema registered by another producer (here: the step record without its optional fields)."""
    parsed = json.loads(to_parsing_canonical_form(latest("step").parsed))
    parsed["fields"] = [f for f in parsed["fields"] if not isinstance(f["type"], list)]
    schema_id = client.register_schema("dev.trainwire.events.Step", Schema(json.dumps(parsed), "AVRO"))
    writer = confluent.writer_of(b"\x00" + schema_id.to_bytes(4, "big") + b"\x00")
    assert writer.kind == "step" and writer.group_key == canonical_fingerprint(writer.schema_json)
    assert writer.group_key != latest("step").fingerprint


def test_unknown_ids_and_foreign_records_are_schema_errors(client, confluent):
    other = client.register_schema("Other", Schema(json.dumps({"type": "record", "name": "Other", "fields": []}),
                                                   "AVRO"))
    for schema_id, says in ((4242, "unknown schema id 4242"), (other, "not a trainwire event")):
        with pytest.raises(SchemaError, match=says):
            confluent.writer_of(b"\x00" + schema_id.to_bytes(4, "big"))


def test_an_unreachable_registry_is_retryable(confluent):
    with socket.socket() as sock:  # a loopback port nobody listens on: connection refused at once
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    down = ConfluentCodec(url, client=SchemaRegistryClient({"url": url, "max.retries": 0, "timeout": 2}))
    with pytest.raises(CodecUnavailableError) as raised:
        down.writer_of(confluent.encode(STEP))
    assert not isinstance(raised.value, SchemaError)
