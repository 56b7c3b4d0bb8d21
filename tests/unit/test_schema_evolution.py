"""Schema evolution: old consumers read new events and new consumers read old ones; the policy holds for every
pair of consecutive versions in schemas/avro (docs/schema-evolution.md)."""

import io
import json
import re
from collections import defaultdict
from importlib import resources

import fastavro
import pytest

from trainwire.schemas import Heartbeat, RunEnded, RunStarted, decode
from trainwire.schemas.codec import MAGIC, registry
from trainwire.schemas.compat import evolution_problems, promotes

AVRO = resources.files("trainwire.schemas").joinpath("avro")
SAMPLES = {"null": None, "boolean": True, "int": 7, "long": 7, "float": 1.5, "double": 1.5, "string": "x",
           "bytes": b"x"}
ENVELOPE = {"event_id": "e-1", "run_id": "r-1", "experiment": "exp", "team": "nlp", "host": "node-1", "seq": 0,
            "ts_ms": 1_700_000_000_000}


def versions() -> dict[str, list[dict]]:
    """Every kind's schemas as JSON, oldest first."""
    found: dict[str, dict[int, dict]] = defaultdict(dict)
    for entry in AVRO.iterdir():
        if match := re.fullmatch(r"([a-z_]+)\.v(\d+)\.avsc", entry.name):
            found[match[1]][int(match[2])] = json.loads(entry.read_text())
    return {kind: [by_version[v] for v in sorted(by_version)] for kind, by_version in found.items()}


def consecutive_pairs() -> list[tuple[str, dict, dict]]:
    return [(f"{kind}.v{i + 1}->v{i + 2}", old, new)
            for kind, schemas in sorted(versions().items()) for i, (old, new) in enumerate(zip(schemas, schemas[1:]))]


def sample(schema):
    """A value of `schema` with no nulls where a union allows more, so that no field passes by being empty."""
    if isinstance(schema, list):
        return sample(next((branch for branch in schema if branch != "null"), "null"))
    if isinstance(schema, str):
        return SAMPLES[schema]
    kind = schema["type"]
    if kind == "array":
        return [sample(schema["items"])]
    if kind == "map":
        return {"k": sample(schema["values"])}
    if kind == "record":
        return {f["name"]: sample(f["type"]) for f in schema["fields"]}
    if kind == "enum":
        return schema["symbols"][0]
    return sample(kind)


def write(schema: dict, record: dict) -> bytes:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, fastavro.parse_schema(schema), record)
    return out.getvalue()


def read(data: bytes, writer: dict, reader: dict) -> dict:
    return fastavro.schemaless_reader(io.BytesIO(data), fastavro.parse_schema(writer), fastavro.parse_schema(reader))


def run_started(version: int) -> dict:
    return versions()["run_started"][version - 1]


def test_versions_are_numbered_from_one_without_gaps():
    for entry in AVRO.iterdir():
        assert re.fullmatch(r"[a-z_]+\.v[1-9]\d*\.avsc", entry.name), entry.name
    counts = {kind: len(schemas) for kind, schemas in versions().items()}
    assert sorted(f"{v.kind}.v{v.version}" for v in registry().values()) == sorted(
        f"{kind}.v{n}" for kind, count in counts.items() for n in range(1, count + 1))


@pytest.mark.parametrize("name, old, new", consecutive_pairs())
def test_consecutive_versions_follow_the_policy(name, old, new):
    assert evolution_problems(old, new) == []


@pytest.mark.parametrize("name, old, new", consecutive_pairs())
def test_old_and_new_readers_read_each_other(name, old, new):
    old_record, new_record = sample(old), sample(new)
    from_old = read(write(old, old_record), old, new)
    from_new = read(write(new, new_record), new, old)
    new_defaults = {f["name"]: f["default"] for f in new["fields"] if f["name"] not in old_record}
    assert from_old == {**{k: v for k, v in old_record.items() if k in from_old}, **new_defaults}
    assert from_new == {f["name"]: new_record[f["name"]] for f in old["fields"] if f["name"] in new_record}


def test_a_v1_consumer_reads_a_v2_run_started():
    record = RunStarted(**ENVELOPE, seed=7, numpy_seed=7, cudnn_deterministic=True,
                        dataset_preprocessing=["dedup", "tokenize"], world_size=8, adapter_json='{"r": 8}')
    back = read(write(run_started(2), record.model_dump()), run_started(2), run_started(1))
    assert back == {k: v for k, v in record.model_dump().items() if k in {f["name"] for f in run_started(1)["fields"]}}
    assert "numpy_seed" not in back and back["seed"] == 7


def test_a_v2_consumer_reads_a_v1_run_started_with_defaults():
    v1_record = {**sample(run_started(1)), **ENVELOPE}
    back = read(write(run_started(1), v1_record), run_started(1), run_started(2))
    assert back["seed"] == v1_record["seed"] and back["dataset_sha256"] == v1_record["dataset_sha256"]
    assert back["numpy_seed"] is None and back["adapter_json"] is None and back["dataset_preprocessing"] == []


def test_the_codec_decodes_a_v1_message_into_the_newest_model():
    v1 = next(v for v in registry().values() if v.kind == "run_started" and v.version == 1)
    v1_record = {**sample(run_started(1)), **ENVELOPE, "dataset_samples": 100, "gpu_count": 1, "total_steps": 10}
    event = decode(MAGIC + v1.fingerprint + write(run_started(1), v1_record))
    assert isinstance(event, RunStarted) and event.run_name == "x" and event.dataset_samples == 100
    assert event.cudnn_benchmark is None and event.dataset_preprocessing == []


def record_schema(*fields: dict, name: str = "R") -> dict:
    return {"type": "record", "name": name, "fields": list(fields)}


A_INT = {"name": "a", "type": "int"}


@pytest.mark.parametrize("old, new, problem", [
    (record_schema(A_INT), record_schema(A_INT, {"name": "b", "type": "string"}), "added field 'b' has no default"),
    (record_schema(A_INT), record_schema(), "removed field 'a' had no default"),
    (record_schema(A_INT), record_schema({"name": "a", "type": "string"}), "field 'a' changes type"),
    (record_schema({"name": "a", "type": "long"}), record_schema(A_INT), "field 'a' changes type"),
    (record_schema({"name": "a", "type": ["null", "int"], "default": None}), record_schema(A_INT),
     "field 'a' changes type"),
    (record_schema(A_INT), record_schema(A_INT, {"name": "b", "type": ["null", "int"], "default": 3}),
     "default of field 'b' is not a null"),
    (record_schema(A_INT), record_schema(A_INT, name="S"), "record renamed"),
    (record_schema({"name": "f", "type": {"type": "array", "items": record_schema(A_INT, name="F")}}),
     record_schema({"name": "f", "type": {"type": "array", "items": record_schema(name="F")}}),
     "field 'f' changes type"),
])
def test_the_checker_names_each_break(old, new, problem):
    assert any(p.startswith(problem) for p in evolution_problems(old, new)), evolution_problems(old, new)


@pytest.mark.parametrize("writer, reader", [
    ("int", "long"), ("long", "double"), ("float", "double"), ("string", "bytes"), ("null", ["null", "string"]),
    (["null", "int"], ["null", "long"]), ({"type": "map", "values": "int"}, {"type": "map", "values": "double"}),
])
def test_promotions_are_allowed(writer, reader):
    assert promotes(writer, reader)
    old, new = record_schema({"name": "a", "type": writer}), record_schema({"name": "a", "type": reader})
    assert evolution_problems(old, new) == []


def test_added_and_removed_fields_with_defaults_pass():
    old = record_schema(A_INT, {"name": "gone", "type": ["null", "string"], "default": None})
    new = record_schema(A_INT, {"name": "tags", "type": {"type": "array", "items": "string"}, "default": []})
    assert evolution_problems(old, new) == []


def schema_of(kind: str, version: int) -> dict:
    return versions()[kind][version - 1]


COUNTERS = {"events_dropped": 3, "events_invalid": 2, "events_spooled": 1_000, "spool_bytes": 2**40}


@pytest.mark.parametrize("kind", ["heartbeat", "run_ended"])
def test_v1_heartbeats_and_run_endeds_decode_with_unknown_producer_counters(kind):
    v1 = next(v for v in registry().values() if v.kind == kind and v.version == 1)
    v1_record = {**sample(schema_of(kind, 1)), **ENVELOPE}
    if kind == "run_ended":
        v1_record.update(status="completed", duration_s=1.0, completed_steps=10, artifacts=[])
    event = decode(MAGIC + v1.fingerprint + write(schema_of(kind, 1), v1_record))
    assert event.kind == kind and all(getattr(event, name) is None for name in COUNTERS)


@pytest.mark.parametrize("model", [Heartbeat, RunEnded])
def test_a_v1_consumer_reads_the_counters_of_a_v2_event_as_absent(model):
    extra = {"status": "failed", "error": "OOM"} if model is RunEnded else {"step": 7}
    event = model(**ENVELOPE, **extra, **COUNTERS)
    newest, oldest = schema_of(model.kind, 2), schema_of(model.kind, 1)
    back = read(write(newest, event.model_dump()), newest, oldest)
    assert not set(COUNTERS) & set(back) and back["run_id"] == "r-1"
    assert {k: v for k, v in read(write(newest, event.model_dump()), newest, newest).items() if k in COUNTERS} == COUNTERS
