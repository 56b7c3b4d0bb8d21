"""The columnar decoder (ClickHouse parses a batch's bodies, checks run on columns) against the per-record path it
replaces (decode_record → Admission.check → check_record): on hostile corpora, the same dead letters with the
same reasons and the same values for every admitted record, each record in exactly one place. The only allowed
difference: a body ClickHouse alone cannot read (the per-record path would admit it) is a dead letter saying so,
since the store could not take it either.
"""

from __future__ import annotations

import io
import json
import math
import re
import subprocess
import sys
import time
import uuid

import fastavro
import numpy as np
import pyarrow as pa
import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.test_poison import poison_cases
from tests.integration.test_poison_properties import payloads
from tests.unit.test_codec_properties import STRATEGIES, same
from trainwire.consumers.admission import Admission
from trainwire.consumers.avro_parser import AvroParser, AvroRefusedError, ParserUnavailableError
from trainwire.consumers import frames
from trainwire.consumers.frames import Decoded, FrameDecoder, reader_schema
from trainwire.infra.config import Settings
from trainwire.infra.log import Record
from trainwire.infra.log.topics import EVENTS, GPU
from trainwire.infra.store import connect_store
from trainwire.schemas import (Checkpoint, CodecUnavailableError, GpuSample, Heartbeat, SingleObjectCodec, Step,
                               encode)
from trainwire.schemas.codec import MAGIC, latest, registry
from trainwire.schemas.confluent import ConfluentCodec
from trainwire.schemas.events import FileDigest
from trainwire.schemas.ocf import container, varint

CLICKHOUSE_ALONE = "ClickHouse cannot read"
ADDRESS = re.compile(r" at 0x[0-9a-f]+")  # reasons quoting a repr (`<_io.BytesIO object at 0x…>`)
SHA = "sha256:" + "ab" * 32
HOSTILE = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                          HealthCheck.too_slow])


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One embedded store for the module, its settings and a parser on it (closed after: chdb keeps one path)."""
    config = Settings(home=tmp_path_factory.mktemp("decoder") / "home")
    connect_store(config.store_dsn).close()  # makes the store's directory
    parser = AvroParser(config.store_dsn)
    yield config, parser
    parser.close()


@pytest.fixture(scope="module")
def confluent():
    return ConfluentCodec("mock://frame-decoder", client=SchemaRegistryClient.new_client(
        {"url": "mock://frame-decoder"}))


def per_record(codec, config: Settings, record: Record, now: int):
    """The per-record path, as ingest runs it with TRAINWIRE_INGEST_PATH=records."""
    return frames.decode_one(codec, Admission(config), record, now)


def reason(outcome) -> str:
    return ADDRESS.sub("", f"{type(outcome).__name__}: {outcome}")


def _maps(kind: str) -> set[str]:
    return {f.name for f in reader_schema(kind) if pa.types.is_map(f.type)}


def as_pairs(kind: str, fields: dict) -> dict:
    """A row (Arrow's, or a decoded record) with its maps as [key, value] pairs in order, so that duplicate keys
    would show and NaN values compare as NaN."""
    maps = _maps(kind)
    return {name: [[k, v] for k, v in (value.items() if isinstance(value, dict) else value)] if name in maps
            else value for name, value in fields.items()}


def assert_as_per_record(decoder: FrameDecoder, codec, config: Settings, records: list[Record],
                         now: int | None = None) -> Decoded:
    now = now_ms() if now is None else now
    decoded = decoder.decode(records, now)
    expected = [per_record(codec, config, record, now) for record in records]
    placed = []
    assert [i for i, _ in decoded.dead_letters] == sorted(i for i, _ in decoded.dead_letters)
    for index, why in decoded.dead_letters:
        placed.append(index)
        if CLICKHOUSE_ALONE in why:
            assert isinstance(expected[index], tuple), f"record {index}: {why} but today: {expected[index]}"
        else:
            assert ADDRESS.sub("", why) == reason(expected[index]), f"record {index}"
    for kind, frame in decoded.frames.items():
        assert frame.table.schema == reader_schema(kind)
        assert list(frame.positions) == sorted(frame.positions) and frame.positions.dtype == np.int64
        assert frame.writer_ids.dtype == np.int32 and len(frame.bodies) == len(frame.positions) == frame.table.num_rows
        for position, row, body, writer_id in zip(frame.positions, frame.table.to_pylist(), frame.bodies,
                                                  frame.writer_ids):
            placed.append(int(position))
            today = expected[position]
            assert isinstance(today, tuple), f"record {position} admitted, but today: {reason(today)}"
            assert today[0] == kind and same(as_pairs(kind, row), as_pairs(kind, today[1])), \
                f"record {position}: {row} != {today[1]}"
            writer = codec.writer_of(records[position].value)
            assert body == records[position].value[writer.header_len:]
            assert frame.writers[writer_id] == writer.schema_json
    assert sorted(placed) == list(range(len(records))), "every record in exactly one place"
    return decoded


def raw(kind: str, version: int | None = None, **fields) -> bytes:
    """A single-object message written from `fields` with fastavro, no model: any value Avro holds."""
    schema = latest(kind) if version is None else next(
        v for v in registry().values() if v.kind == kind and v.version == version)
    out = io.BytesIO()
    out.write(MAGIC + schema.fingerprint)
    fastavro.schemaless_writer(out, schema.parsed, fields)
    return out.getvalue()


def envelope(seq: int = 1, **fields) -> dict:
    return {"event_id": uuid.uuid4().hex, "run_id": "run", "experiment": "x", "team": "", "host": "h", "seq": seq,
            "ts_ms": now_ms(), **fields}


def step_fields(**fields) -> dict:
    return {"step": 1, "epoch": None, "loss": 1.0, "learning_rate": None, "grad_norm": None, "tokens_per_s": None,
            "samples_per_s": None, "batch_time_s": None, "tokens": None, "extra": {}, **fields}


def gpu_fields(**fields) -> dict:
    return {"rank": 0, "gpu_index": 0, "gpu_uuid": "GPU-0", "gpu_name": "H100", "utilization_pct": 50.0,
            "memory_used_mb": None, "memory_total_mb": None, "temperature_c": None, "power_w": None,
            "sm_clock_mhz": None, "mem_clock_mhz": None, **fields}


def offset_of(kind: str, fields: dict, name: str) -> int:
    """Where field `name` starts in the body of `fields` (10 is the single-object header)."""
    schema = latest(kind).parsed
    before = schema["fields"][:[f["name"] for f in schema["fields"]].index(name)]
    out = io.BytesIO()
    fastavro.schemaless_writer(out, fastavro.parse_schema({**schema, "name": "Before", "fields": before}),
                               {f["name"]: fields[f["name"]] for f in before})
    return 10 + len(out.getvalue())


def patched(message: bytes, at: int, old: bytes, new: bytes) -> bytes:
    assert message[at:at + len(old)] == old, (message[at:at + len(old)], old)
    return message[:at] + new + message[at + len(old):]


def hostile_bodies() -> dict[str, bytes]:
    """name → message; each is something ClickHouse's Avro reader takes differently from fastavro, or refuses."""
    step, gpu = envelope(**step_fields(epoch=None)), envelope(**gpu_fields())
    good = raw("step", **step)
    marked = raw("step", **envelope(host="MARK", **step_fields(extra={"aaaa": 1.0, "MARK": 2.0})))
    checkpoint = envelope(step=1, path="/ckpt", files=[{"name": "MARK", "size": 1, "sha256": SHA}],
                          eval_loss=None, is_best=True, deleted=None)
    epoch_at, rank_at = offset_of("step", step, "epoch"), offset_of("gpu_sample", gpu, "rank")
    is_best_at = offset_of("checkpoint", checkpoint, "is_best")
    return {
        "trailing bytes": good + b"\x00\x00",
        "truncated": good[:-3],
        "empty body": good[:10],
        "invalid UTF-8 in a string": marked.replace(b"\x08MARK", b"\x08\xff\xfe\xfd\xfc", 1),
        "invalid UTF-8 in a map key": marked[::-1].replace(b"KRAM", b"\xfc\xfd\xfe\xff", 1)[::-1],
        "invalid UTF-8 in a nested record": raw("checkpoint", **checkpoint).replace(b"MARK", b"\xed\xa0\x80!"),
        "surrogate in a string": marked.replace(b"MARK", b"\xed\xa0\x80!", 1),
        "duplicate map keys": marked.replace(b"aaaa", b"MARK"),
        "union index 2 read as null": patched(good, epoch_at, b"\x00", b"\x04"),
        "union index -1": patched(good, epoch_at, b"\x00", b"\x01"),
        "non-minimal varint": patched(good, epoch_at - 1, b"\x02", b"\x82\x00"),  # the step field, 1
        "boolean byte 2": patched(raw("checkpoint", **checkpoint), is_best_at, b"\x02\x01", b"\x02\x04"),
        "int past 32 bits": patched(raw("gpu_sample", **gpu), rank_at, b"\x00", varint(2**33)),
        "negative length": patched(good, 10, b"\x40", b"\x03"),
        "huge length": patched(good, 10, b"\x40", varint(2**40)),
        "length past the block": patched(good, 10, b"\x40", varint(2**20)),
        "body larger than 16 KiB": raw("step", **envelope(**step_fields(extra={f"m{i}": 1.0 for i in range(2_000)}))),
    }


def test_each_hostile_body_between_neighbours_ends_as_today(store):
    config, parser = store
    codec = SingleObjectCodec()
    decoder = FrameDecoder(codec, config, parser)
    events = config.topic(EVENTS)
    for name, message in hostile_bodies().items():
        topic = config.topic(GPU) if name == "int past 32 bits" else events
        neighbours = [encode(Step(run_id="n", experiment="x", seq=i, step=i, loss=0.5)) for i in range(4)]
        records = [Record(events, 0, 0, b"n", neighbours[0], 0), Record(events, 0, 1, b"n", neighbours[1], 0),
                   Record(topic, 0, 2, b"r", message, 0), Record(events, 0, 3, b"n", neighbours[2], 0)]
        decoded = assert_as_per_record(decoder, codec, config, records)
        assert list(decoded.frames["step"].positions[:2]) == [0, 1], name
        assert 3 in decoded.frames["step"].positions, name


def test_a_body_only_clickhouse_refuses_is_a_dead_letter_with_its_reason_and_spares_its_neighbours(store):
    config, parser = store
    codec = SingleObjectCodec()
    message = hostile_bodies()["boolean byte 2"]
    assert isinstance(per_record(codec, config, Record(config.topic(EVENTS), 0, 0, b"", message, 0), now_ms()),
                      tuple), "fastavro reads the byte 2 as True"
    records = [Record(config.topic(EVENTS), 0, i, b"", m, 0) for i, m in enumerate(
        [raw("checkpoint", **envelope(i, step=i, path="/c", files=[], eval_loss=None, is_best=False, deleted=None))
         for i in range(5)] + [message] + [raw("checkpoint", **envelope(9, step=9, path="/c", files=[],
                                                                          eval_loss=None, is_best=None, deleted=None))])]
    decoded = assert_as_per_record(FrameDecoder(codec, config, parser), codec, config, records)
    ((index, why),) = decoded.dead_letters
    assert index == 5 and why.startswith(f"CorruptPayloadError: {CLICKHOUSE_ALONE} this checkpoint body: Code: 748")
    assert "Invalid value for bool" in why and "/dev/shm" not in why
    assert list(decoded.frames["checkpoint"].positions) == [0, 1, 2, 3, 4, 6]


def test_the_poison_cases_end_as_today(store):
    config, parser = store
    codec = SingleObjectCodec()
    records = []
    for topic, payload, _ in poison_cases("victim").values():
        records += [Record(config.topic(topic), 0, len(records), b"v", payload, 0),
                    Record(config.topic(EVENTS), 0, len(records) + 1, b"n",
                           encode(Step(run_id="n", experiment="x", seq=len(records), step=1)), 0)]
    decoded = assert_as_per_record(FrameDecoder(codec, config, parser), codec, config, records)
    assert len(decoded.dead_letters) == len(poison_cases("victim"))


@pytest.mark.parametrize("codec_name", ["single-object", "confluent"])
def test_valid_events_of_every_kind_in_both_formats_decode_as_today(store, confluent, codec_name):
    config, parser = store
    codec = SingleObjectCodec() if codec_name == "single-object" else confluent
    decoder = FrameDecoder(codec, config, parser)
    topics = [config.topic(EVENTS), config.topic(GPU)]

    @HOSTILE
    @given(st.lists(st.tuples(st.one_of(*STRATEGIES.values()), st.sampled_from(topics),
                              st.sampled_from(["now", "ten years ago", "as drawn"])), min_size=1, max_size=30))
    def decodes_as_today(drawn):
        now = now_ms()
        records = []
        for event, topic, when in drawn:
            ts = {"now": now, "ten years ago": now - 3650 * 86_400_000, "as drawn": event.ts_ms}[when]
            records.append(Record(topic, 0, len(records), b"k", codec.encode(event.model_copy(update={"ts_ms": ts})),
                                  0))
        assert_as_per_record(decoder, codec, config, records, now)

    decodes_as_today()


def test_any_payload_between_valid_neighbours_ends_as_today(store):
    """The poison property test's payloads: random bytes, random bodies after a real header, and events of every
    kind with every field at the edges of its Avro and column type."""
    config, parser = store
    codec = SingleObjectCodec()
    decoder = FrameDecoder(codec, config, parser)

    @HOSTILE
    @given(st.lists(st.tuples(payloads(), st.booleans()), min_size=1, max_size=20))
    def ends_as_today(drawn):
        records = []
        for (_, value), on_gpu in drawn:
            records.append(Record(config.topic(EVENTS), 0, len(records), b"n",
                                  encode(Step(run_id="n", experiment="x", seq=len(records), step=1)), 0))
            records.append(Record(config.topic(GPU if on_gpu else EVENTS), 0, len(records), b"p", value, 0))
        assert_as_per_record(decoder, codec, config, records)

    ends_as_today()


def test_mutated_bodies_end_as_today(store):
    """Valid messages with a few bytes changed, cut or added: the corpus that finds readers disagreeing."""
    config, parser = store
    codec = SingleObjectCodec()
    decoder = FrameDecoder(codec, config, parser)
    messages = [encode(Step(run_id="r", experiment="x", seq=1, step=1, loss=0.5, epoch=None, tokens=7,
                            extra={"a": 1.0})),
                encode(GpuSample(run_id="r", experiment="x", seq=1, gpu_index=3, gpu_uuid="u", power_w=None)),
                encode(Checkpoint(run_id="r", experiment="x", seq=1, step=1, path="/p", is_best=True,
                                  files=[FileDigest(name="f", size=1, sha256=SHA)]))]
    interesting = st.sampled_from([0, 1, 2, 3, 4, 0x7F, 0x80, 0xFF, 0xC3, 0xED]) | st.integers(0, 255)

    @HOSTILE
    @given(st.lists(st.tuples(st.sampled_from(messages), st.lists(st.tuples(st.integers(10, 300), interesting),
                                                                   max_size=3),
                              st.integers(-3, 3)), min_size=1, max_size=30))
    def ends_as_today(drawn):
        records = []
        for message, changes, cut in drawn:
            value = bytearray(message)
            for at, byte in changes:
                value[at % len(value)] = byte
            value = bytes(value[:cut] if cut < 0 else value + b"\x00" * cut)
            topic = config.topic(GPU if codec.writer_of(message).kind == "gpu_sample" else EVENTS)
            records.append(Record(topic, 0, len(records), b"k", value, 0))
        assert_as_per_record(decoder, codec, config, records)

    ends_as_today()


def test_older_writers_get_the_readers_defaults_and_share_one_frame(store):
    config, parser = store
    codec = SingleObjectCodec()
    old = raw("heartbeat", 1, **envelope(1, step=5))
    new = encode(Heartbeat(run_id="run", experiment="x", seq=2, step=6, events_dropped=3))
    older_run_started = raw("run_started", 1, **{
        f["name"]: f.get("default") for f in next(v for v in registry().values()
                                                 if v.kind == "run_started" and v.version == 1).parsed["fields"]
        if "default" in f} | envelope(3))
    records = [Record(config.topic(EVENTS), 0, i, b"k", m, 0) for i, m in enumerate([old, new, old,
                                                                                   older_run_started])]
    decoded = assert_as_per_record(FrameDecoder(codec, config, parser), codec, config, records)
    beats = decoded.frames["heartbeat"]
    assert list(beats.positions) == [0, 1, 2] and beats.table.column("events_dropped").to_pylist() == [None, 3, None]
    assert len(beats.writers) == 2 and list(beats.writer_ids) == [0, 1, 0]
    started = decoded.frames["run_started"].table.to_pylist()[0]
    assert started["dataset_preprocessing"] == [] and started["world_size"] is None


def test_an_unreachable_registry_is_retried_not_dead_lettered(store, confluent):
    config, parser = store
    down = ConfluentCodec("http://127.0.0.1:9", client=SchemaRegistryClient(
        {"url": "http://127.0.0.1:9", "max.retries": 0, "timeout": 2}))
    message = confluent.encode(Step(run_id="r", experiment="x", seq=1, step=1))
    with pytest.raises(CodecUnavailableError):
        FrameDecoder(down, config, parser).decode([Record(config.topic(EVENTS), 0, 0, b"", message, 0)], now_ms())


def test_a_refused_container_leaves_nothing_behind_for_the_next_query(store):
    """chdb hands what a failed query had written to the next query of its connection: the parser reads it out,
    and does its work on a connection of its own, never the store client's."""
    config, parser = store
    schema = json.dumps({"type": "record", "name": "R", "fields": [{"name": "x", "type": "long"}]})
    client = connect_store(config.store_dsn)
    try:
        with pytest.raises(AvroRefusedError, match="EOF reached"):
            parser.parse(container(schema, [b"\x02", b""]), "x")
        assert client.query("SELECT 41 + 1").result_rows == [(42,)]
        assert parser.parse(container(schema, [b"\x02", b"\x04"]), "x").column("x").to_pylist() == [1, 2]
    finally:
        client.close()


def test_an_engine_failure_is_not_a_refusal(store):
    config, parser = store
    schema = json.dumps({"type": "record", "name": "R", "fields": [{"name": "x", "type": "long"}]})
    with pytest.raises(ParserUnavailableError, match="UNKNOWN_IDENTIFIER"):
        parser.parse(container(schema, [b"\x02"]), "no_such_column")


def test_when_clickhouse_cannot_parse_at_all_the_per_record_path_decodes_the_batch(store, monkeypatch, caplog):
    """Say /dev/shm is full: slower, but every record ends as it would have."""
    config, _ = store
    monkeypatch.setattr("trainwire.consumers.avro_parser._scratch_dir", lambda: "/nonexistent/scratch")
    broken = AvroParser(config.store_dsn)
    codec = SingleObjectCodec()
    try:
        records = [Record(config.topic(EVENTS), 0, i, b"", m, 0) for i, m in enumerate(
            [encode(Step(run_id="r", experiment="x", seq=i, step=i, loss=0.5)) for i in range(3)]
            + [hostile_bodies()["truncated"], hostile_bodies()["union index 2 read as null"]])]
        decoded = assert_as_per_record(FrameDecoder(codec, config, broken), codec, config, records)
    finally:
        broken.close()
    assert [i for i, _ in decoded.dead_letters] == [3, 4] and len(decoded.frames["step"].positions) == 3
    assert "decoded one by one instead" in caplog.text


def test_with_a_clickhouse_server_store_the_parse_runs_in_a_process_local_engine(tmp_path):
    """No server is reached: an http store's parser parses in its own in-memory chdb (a fresh process, since chdb
    keeps one engine per process and this one has a store open)."""
    script = """
import json
from trainwire.consumers.avro_parser import AvroParser
from trainwire.schemas.ocf import container
schema = json.dumps({"type": "record", "name": "R", "fields": [{"name": "s", "type": "string"}]})
parser = AvroParser("http://127.0.0.1:9")
print(parser.parse(container(schema, [b"\\x06abc", b"\\x00"]), "s").column("s").to_pylist())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "['abc', '']"


def test_nan_and_signed_zero_survive(store):
    config, parser = store
    codec = SingleObjectCodec()
    records = [Record(config.topic(EVENTS), 0, i, b"", encode(Step(run_id="r", experiment="x", seq=i, step=i,
                                                                 loss=loss, extra={"z": -0.0})), 0)
               for i, loss in enumerate([math.nan, -0.0, math.inf])]
    decoded = assert_as_per_record(FrameDecoder(codec, config, parser), codec, config, records)
    losses = decoded.frames["step"].table.column("loss").to_pylist()
    assert math.isnan(losses[0]) and math.copysign(1, losses[1]) == -1 and losses[2] == math.inf


def test_a_few_truncated_bodies_in_a_large_poll_cost_a_few_parses_not_the_poll_through_fastavro(store, monkeypatch):
    config, parser = store
    codec = SingleObjectCodec()
    decoder = FrameDecoder(codec, config, parser)
    records = [Record(config.topic(EVENTS), 0, i, b"k", encode(Step(run_id=f"r{i % 50}", experiment="x", seq=i,
                                                                    step=i, loss=0.5)), 0) for i in range(5_000)]
    for i in (17, 2_500, 4_999):
        records[i] = records[i]._replace(value=records[i].value[:-5])
    judged = []
    monkeypatch.setattr("trainwire.consumers.frames.decode_one",
                        lambda *args, _decode=frames.decode_one: judged.append(args[2]) or _decode(*args))
    decoded = decoder.decode(records, now_ms())
    assert [i for i, _ in decoded.dead_letters] == [17, 2_500, 4_999]
    assert all(why.startswith("CorruptPayloadError: corrupt step v1 body") for _, why in decoded.dead_letters)
    assert len(decoded.frames["step"].positions) == 4_997
    assert len(judged) <= 3 * 256, "only the small refused parts go through the per-record path"


def foreign_step_schema(**types) -> dict:
    """The step record as another producer registered it: fields reordered, the optional metrics left out, some
    types narrower (Avro promotes them)."""
    fields = [{"name": n, "type": types.get(n, t)} for n, t in [
        ("seq", "long"), ("event_id", "string"), ("run_id", "string"), ("experiment", "string"), ("ts_ms", "long"),
        ("step", "long"), ("loss", ["null", "double"]), ("extra", {"type": "map", "values": "double"})]]
    return {"type": "record", "name": "Step", "namespace": "dev.trainwire.events", "fields": fields}


@pytest.mark.parametrize("types, columnar", [
    ({}, True),
    ({"step": "int", "loss": ["null", "float"], "extra": {"type": "map", "values": "float"}}, True),
    ({"loss": ["null", "double", "string"]}, False),  # a union the columnar path leaves to the per-record one
])
def test_a_foreign_writer_is_resolved_against_the_reader_as_today(store, confluent, types, columnar):
    from confluent_kafka.schema_registry import Schema

    config, parser = store
    schema = foreign_step_schema(**types)
    client = confluent._client
    schema_id = client.register_schema("dev.trainwire.events.Step", Schema(json.dumps(schema), "AVRO"))
    parsed = fastavro.parse_schema(schema)
    records = []
    for i, loss in enumerate([0.5, None, math.nan, 0.25]):
        out = io.BytesIO(b"\x00" + schema_id.to_bytes(4, "big"))
        out.seek(0, 2)
        fastavro.schemaless_writer(out, parsed, {"seq": i, "event_id": f"e{i}", "run_id": "r", "experiment": "x",
                                                 "ts_ms": now_ms(), "step": i, "loss": loss, "extra": {"a": 1.5}})
        records.append(Record(config.topic(EVENTS), 0, i, b"", out.getvalue(), 0))
    decoder = FrameDecoder(confluent, config, parser)
    decoded = assert_as_per_record(decoder, confluent, config, records)
    table = decoded.frames["step"].table
    assert table.column("grad_norm").null_count == 4 and table.column("team").to_pylist() == [""] * 4
    assert (decoder._plans[confluent.writer_of(records[0].value).group_key] is not None) == columnar
