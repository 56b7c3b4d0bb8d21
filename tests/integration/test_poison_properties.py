"""Property-based poison: any bytes, and any event Avro can hold with every field at the edges of its Avro and
column type, between valid neighbours, through the real ingest pipeline into the embedded ClickHouse.

Whatever the payload, the neighbours are stored, the payload is stored or dead-lettered (never lost, never
both), and ingest goes on.
"""

import io
import math
import time
import uuid

import fastavro
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from trainwire.consumers.rows import TABLE_FOR_KIND
from trainwire.consumers.service import build_ingest
from trainwire.infra.config import Settings
from trainwire.infra.log import open_producer
from trainwire.infra.log.topics import EVENTS, GPU
from trainwire.infra.store import connect_store
from trainwire.schemas import Step, encode
from trainwire.schemas.codec import MAGIC, latest

KINDS = ["run_started", "step", "eval", "gpu_sample", "heartbeat", "checkpoint", "run_ended", "alert"]
LONG_EDGES = [-(2**63), -1, 0, 1, 2**15, 2**16 - 1, 2**16, 2**31 - 1, 2**32, 2**63 - 1]
INT_EDGES = [-(2**31), -1, 0, 1, 2**16, 2**31 - 1]
DOUBLE_EDGES = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e308, -1e308, 5e-324]
TEXT = st.sampled_from(["", " ", "\x00", "é", "r" * 300, "\u2028", "x"]) | st.text(max_size=12)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _value(avro_type, name: str) -> st.SearchStrategy:
    if isinstance(avro_type, list):
        return st.one_of(*[_value(t, name) for t in avro_type])
    if isinstance(avro_type, dict):
        kind = avro_type["type"]
        if kind == "array":
            return st.lists(_value(avro_type["items"], name), max_size=2)
        if kind == "map":
            return st.dictionaries(TEXT, _value(avro_type["values"], name), max_size=2)
        if kind == "record":
            return st.fixed_dictionaries({f["name"]: _value(f["type"], f["name"]) for f in avro_type["fields"]})
        if kind == "enum":
            return st.sampled_from(avro_type["symbols"])
        return _value(kind, name)
    if name == "ts_ms":  # mostly now, so the rest of the record is what gets judged
        return st.sampled_from([now_ms()]) | st.sampled_from(LONG_EDGES)
    return {
        "null": st.none(),
        "boolean": st.booleans(),
        "int": st.sampled_from(INT_EDGES),
        "long": st.sampled_from(LONG_EDGES) | st.integers(0, 10),
        "float": st.sampled_from(DOUBLE_EDGES),
        "double": st.sampled_from(DOUBLE_EDGES) | st.floats(),
        "string": TEXT,
        "bytes": st.binary(max_size=8),
    }[avro_type]


@st.composite
def edge_events(draw) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(KINDS))
    schema = latest(kind)
    fields = {f["name"]: draw(_value(f["type"], f["name"])) for f in schema.parsed["fields"]}
    fields["event_id"] = uuid.uuid4().hex
    out = io.BytesIO()
    out.write(MAGIC + schema.fingerprint)
    fastavro.schemaless_writer(out, schema.parsed, fields)
    return kind, out.getvalue()


def payloads() -> st.SearchStrategy:
    raw_bytes = st.binary(max_size=64).map(lambda b: ("bytes", b))
    prefixed = st.binary(max_size=64).map(lambda b: ("bytes", MAGIC + latest("step").fingerprint + b))
    return raw_bytes | prefixed | edge_events()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    settings = Settings(home=tmp_path_factory.mktemp("poison") / "home", batch_max_seconds=0.1)
    pipeline = build_ingest(settings, on_alert=lambda alert: None)
    producer = open_producer(settings)
    client = connect_store(settings.store_dsn)
    yield settings, pipeline, producer, client
    client.close()
    producer.close()
    pipeline.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(payload=payloads(), on_gpu_topic=st.booleans())
def test_any_payload_between_valid_neighbours_is_stored_or_dead_lettered(pipeline, payload, on_gpu_topic):
    settings, ingest, producer, client = pipeline
    kind, value = payload
    neighbour = f"neighbour-{uuid.uuid4().hex[:8]}"
    before = Step(run_id=neighbour, experiment="p", host="h", seq=1, step=1, loss=1.0)
    after = Step(run_id=neighbour, experiment="p", host="h", seq=2, step=2, loss=math.nan)
    poisoned_topic = settings.topic(GPU if on_gpu_topic else EVENTS)
    producer.append(settings.topic(EVENTS), neighbour.encode(), encode(before))
    producer.append(poisoned_topic, b"", value)
    producer.append(settings.topic(EVENTS), neighbour.encode(), encode(after))
    assert producer.flush(10) == 0
    dead_before = ingest.stats.dead_lettered
    stored_before = ingest.stats.stored

    assert ingest.drain(idle_seconds=0.2, deadline=time.monotonic() + 60)

    stored_steps = client.query("SELECT step FROM steps FINAL WHERE run_id = {r:String} ORDER BY step",
                                parameters={"r": neighbour}).result_rows
    assert stored_steps == [(1,), (2,)]
    dead = ingest.stats.dead_lettered - dead_before
    stored = ingest.stats.stored - stored_before - 2
    assert (dead, stored) in ((1, 0), (0, 1)), f"{kind} payload: {dead} dead letters, {stored} stored"
    if stored and kind != "bytes":
        table = TABLE_FOR_KIND[kind]
        assert client.query(f"SELECT count() FROM {table}").result_rows[0][0] >= 1
    # the NaN after the payload is still detected, whatever came before it
    fired = client.query("SELECT count() FROM alerts FINAL WHERE run_id = {r:String} AND rule = 'loss_not_finite'",
                         parameters={"r": neighbour}).result_rows[0][0]
    assert fired == 1
