"""The Confluent Schema Registry wire format, against confluent-kafka's in-memory `mock://` registry."""

import json
import math
import socket

import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

from trainwire.consumers.ingest import IngestPipeline
from trainwire.consumers.writer import ClickHouseWriter
from trainwire.infra.codecs import codec_for
from trainwire.infra.config import ConfigError, Settings, load_settings
from trainwire.infra.log import open_consumer, open_producer
from trainwire.infra.store import connect_store, migrate
from trainwire.infra.store.read import StoreReader
from trainwire.schemas import (
    Alert, Checkpoint, CorruptPayloadError, Eval, GpuSample, Heartbeat, RunEnded, RunStarted, SchemaError,
    SingleObjectCodec, Step, UnknownSchemaError, decode, encode,
)
from trainwire.schemas.confluent import ConfluentCodec, RegistryUnavailableError, subject_for

ENV = {"run_id": "r-1", "experiment": "exp", "team": "nlp", "host": "node-1", "seq": 3}
DIGEST = {"name": "adapter_model.safetensors", "size": 12, "sha256": "sha256:" + "ab" * 32}
EXAMPLES = [
    RunStarted(**ENV, run_name="lr-2e-4", tags={"a": "b"}, seed=42, git_dirty=True, total_steps=3000),
    Step(**ENV, step=10, loss=1.5, learning_rate=2e-4, grad_norm=0.9, extra={"aux": 1.0}),
    Eval(**ENV, step=100, eval_loss=0.5, perplexity=math.exp(0.5), metrics={"rouge1": 0.4}),
    GpuSample(**ENV, gpu_index=0, gpu_uuid="GPU-1", utilization_pct=93.0, temperature_c=70.0),
    Heartbeat(**ENV, step=5),
    Checkpoint(**ENV, step=500, path="/out/checkpoint-500", files=[DIGEST], eval_loss=0.4, is_best=True),
    RunEnded(**ENV, status="completed", duration_s=11700.0, final_loss=0.35, artifacts=[DIGEST]),
    Alert(run_id="r-1", experiment="exp", rule="loss_spike", severity="critical", state="firing", dedup_key="k"),
]
STEP = EXAMPLES[1]


@pytest.fixture
def client() -> SchemaRegistryClient:
    """A fresh in-memory registry for each test."""
    return SchemaRegistryClient.new_client({"url": "mock://test"})


@pytest.fixture
def codec(client) -> ConfluentCodec:
    return ConfluentCodec("mock://test", client=client)


@pytest.mark.parametrize("event", EXAMPLES, ids=lambda e: e.kind)
def test_every_kind_round_trips(codec, event):
    assert decode(codec.encode(event), codec) == event


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_metrics_survive(codec, value):
    back = decode(codec.encode(Step(**ENV, step=1, loss=value, grad_norm=value, extra={"x": value})), codec)
    for got in (back.loss, back.grad_norm, back.extra["x"]):
        assert (math.isnan(got) and math.isnan(value)) or got == value


def test_header_is_magic_zero_and_the_registered_schema_id(codec, client):
    data = codec.encode(STEP)
    schema_id = int.from_bytes(data[1:5], "big")
    assert data[0] == 0
    assert client.get_latest_version(subject_for("step")).schema_id == schema_id
    assert json.loads(client.get_schema(schema_id).schema_str)["name"] == "Step"


def test_one_subject_per_kind_named_after_its_record(codec, client):
    ids = {event.kind: codec.encode(event)[1:5] for event in EXAMPLES}
    assert len(set(ids.values())) == len(EXAMPLES)
    assert sorted(client.get_subjects()) == sorted(f"dev.trainwire.events.{type(e).__name__}" for e in EXAMPLES)


def test_registry_is_asked_once_per_kind_and_once_per_id(client, monkeypatch):
    calls = []
    for name in ("register_schema", "get_schema"):
        method = getattr(client, name)
        monkeypatch.setattr(client, name, lambda *a, _m=method, _n=name, **k: calls.append(_n) or _m(*a, **k))
    producer, consumer = ConfluentCodec("mock://test", client=client), ConfluentCodec("mock://test", client=client)
    for _ in range(3):
        consumer.decode_record(producer.encode(STEP))
    assert calls == ["register_schema", "get_schema"]


def test_reads_single_object_messages_too(codec):
    """A deployment switching formats has messages of both kinds in flight."""
    assert decode(encode(STEP), codec) == STEP
    assert decode(codec.encode(STEP), codec) == STEP


def test_ingest_with_the_confluent_codec_stores_both_formats_and_dead_letters_garbage(codec, local_settings):
    producer = open_producer(local_settings)
    topic = local_settings.topic("events")
    for value in (codec.encode(STEP), encode(EXAMPLES[4]), b"\x07garbage"):
        producer.append(topic, b"r-1", value)
    producer.flush(5)
    client = connect_store(local_settings.store_dsn)
    migrate(client)
    pipeline = IngestPipeline(open_consumer(local_settings, "g", [topic]), ClickHouseWriter(client), None,
                              local_settings, codec=codec, on_alert=lambda alert: None)
    pipeline.drain(idle_seconds=0.5)
    pipeline.close()
    reader = StoreReader(connect_store(local_settings.store_dsn))
    assert reader.event_counts()["steps"] == 1 and reader.event_counts()["heartbeats"] == 1
    (letter,) = reader.dead_letters()
    assert letter["offset"] == 3 and "CorruptPayloadError" in letter["reason"]
    assert open_consumer(local_settings, "g", [topic]).poll(10, 0.1) == [], "everything was committed"


def test_unknown_schema_id_is_named(codec):
    with pytest.raises(UnknownSchemaError, match="unknown schema id 4242"):
        codec.decode_record(b"\x00" + (4242).to_bytes(4, "big") + b"\x00")


def test_a_schema_that_is_not_a_trainwire_event_is_unknown(codec, client):
    other = Schema(json.dumps({"type": "record", "name": "Other", "fields": []}), "AVRO")
    schema_id = client.register_schema("Other", other)
    with pytest.raises(UnknownSchemaError, match="'Other', not a trainwire event"):
        codec.decode_record(b"\x00" + schema_id.to_bytes(4, "big"))


@pytest.mark.parametrize("data, says", [
    (b"\x07garbage", "neither a Confluent"),
    (b"\x00\x00\x01", "neither a Confluent"),
    (b"", "first bytes none"),
])
def test_bytes_in_neither_format_are_corrupt(codec, data, says):
    with pytest.raises(CorruptPayloadError, match=says):
        codec.decode_record(data)


def test_truncated_body_is_corrupt(codec):
    with pytest.raises(CorruptPayloadError, match="corrupt step body"):
        codec.decode_record(codec.encode(STEP)[:-5])


def test_trailing_bytes_are_corrupt(codec):
    with pytest.raises(CorruptPayloadError, match="trailing bytes"):
        codec.decode_record(codec.encode(STEP) + b"\x00\x00")


def test_unregistered_schema_without_auto_register_is_unknown(client):
    with pytest.raises(UnknownSchemaError, match="refused step"):
        ConfluentCodec("mock://test", client=client, auto_register=False).encode(STEP)


def test_unreachable_registry_is_retryable_not_a_schema_error(codec):
    with socket.socket() as sock:  # a loopback port nobody listens on: connection refused at once
        sock.bind(("127.0.0.1", 0))
        url = f"http://user:secret@127.0.0.1:{sock.getsockname()[1]}"
    down = ConfluentCodec(url, client=SchemaRegistryClient({"url": url, "max.retries": 0, "timeout": 2}))
    for attempt in (lambda: down.encode(STEP), lambda: down.decode_record(codec.encode(STEP))):
        with pytest.raises(RegistryUnavailableError, match="unavailable") as raised:
            attempt()
        assert not isinstance(raised.value, SchemaError)
        assert "secret" not in str(raised.value)


@pytest.mark.parametrize("status", [500, 503, 401, 403])
def test_registry_errors_other_than_not_found_are_retryable(codec, client, monkeypatch, status):
    data = codec.encode(STEP)
    fresh = ConfluentCodec("mock://test", client=client)  # nothing cached yet

    def fail(*args, **kwargs):
        raise SchemaRegistryError(status, status * 100, "registry trouble")
    monkeypatch.setattr(client, "get_schema", fail)
    with pytest.raises(RegistryUnavailableError, match=f"HTTP status code {status}"):
        fresh.decode_record(data)


def test_codec_for_picks_the_format_from_settings():
    assert isinstance(codec_for(Settings()), SingleObjectCodec)
    settings = Settings(schema_registry="mock://x")
    producer, consumer = codec_for(settings), codec_for(settings)
    assert isinstance(producer, ConfluentCodec)
    data = producer.encode(STEP)
    assert data[0] == 0 and decode(data, consumer) == STEP  # one in-memory registry per mock:// URL


@pytest.mark.parametrize("value", ["http://registry:8081", "https://u:p@sr.example.com", "mock://demo"])
def test_schema_registry_setting_accepts_urls(monkeypatch, value):
    monkeypatch.setenv("TRAINWIRE_SCHEMA_REGISTRY", value)
    assert load_settings().schema_registry == value


@pytest.mark.parametrize("value", ["registry:8081", "ftp://registry", "http://", "mock:x"])
def test_invalid_schema_registry_names_its_variable(monkeypatch, value):
    monkeypatch.setenv("TRAINWIRE_SCHEMA_REGISTRY", value)
    with pytest.raises(ConfigError, match="TRAINWIRE_SCHEMA_REGISTRY"):
        load_settings()
