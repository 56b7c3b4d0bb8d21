import json
import math
from importlib import resources

import fastavro
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from trainwire.schemas import (
    EVENT_TYPES, Alert, Checkpoint, CorruptPayloadError, Eval, GpuSample, Heartbeat, InvalidEventError, RunEnded,
    RunStarted, Step, StopCommand, UnknownSchemaError, decode, encode,
)
from trainwire.schemas.codec import MAGIC, latest

ENV = {"run_id": "r-1", "experiment": "exp", "team": "nlp", "host": "node-1", "seq": 3}
DIGEST = {"name": "adapter_model.safetensors", "size": 12, "sha256": "sha256:" + "ab" * 32}

EXAMPLES = [
    RunStarted(**ENV, run_name="lr-2e-4", tags={"a": "b"}, hyperparameters_json='{"lr": 0.0002}', seed=42,
               git_dirty=True, environment={"torch": "2.5"}, total_steps=3000, dataset_samples=9000),
    Step(**ENV, step=10, loss=1.5, learning_rate=2e-4, grad_norm=0.9, tokens_per_s=3000.0, extra={"aux": 1.0}),
    Eval(**ENV, step=100, eval_loss=0.5, perplexity=math.exp(0.5), metrics={"rouge1": 0.4}),
    GpuSample(**ENV, gpu_index=0, gpu_uuid="GPU-1", utilization_pct=93.0, memory_used_mb=1.0, temperature_c=70.0),
    Heartbeat(**ENV, step=5),
    Checkpoint(**ENV, step=500, path="/out/checkpoint-500", files=[DIGEST], eval_loss=0.4, is_best=True),
    RunEnded(**ENV, status="completed", duration_s=11700.0, final_loss=0.35, artifacts=[DIGEST]),
    Alert(run_id="r-1", experiment="exp", rule="loss_spike", severity="critical", state="firing", dedup_key="k"),
    StopCommand(run_id="r-1", experiment="exp", rule="loss_not_finite", step=40, reason="loss_not_finite: loss nan",
                dedup_key="k"),
]


@pytest.mark.parametrize("event", EXAMPLES, ids=lambda e: e.kind)
def test_every_kind_round_trips(event):
    assert decode(encode(event)) == event


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_metrics_survive(value):
    back = decode(encode(Step(**ENV, step=1, loss=value, grad_norm=value, extra={"x": value})))
    for got in (back.loss, back.grad_norm, back.extra["x"]):
        assert (math.isnan(got) and math.isnan(value)) or got == value


def test_missing_optional_fields_decode_as_none():
    back = decode(encode(Step(**ENV, step=1)))
    assert back.loss is None and back.learning_rate is None and back.extra == {}


def test_models_mirror_the_avro_schemas():
    for kind, model in EVENT_TYPES.items():
        avro_fields = [f["name"] for f in latest(kind).parsed["fields"]]
        assert avro_fields == list(model.model_fields), kind


def test_schema_files_are_versioned_and_parse():
    names = [e.name for e in resources.files("trainwire.schemas").joinpath("avro").iterdir()]
    assert sorted({n.split(".")[0] for n in names}) == sorted(EVENT_TYPES)
    for name in names:
        assert ".v" in name
        fastavro.parse_schema(json.loads(resources.files("trainwire.schemas").joinpath("avro", name).read_text()))


def test_random_bytes_are_a_corrupt_payload():
    with pytest.raises(CorruptPayloadError, match="not an Avro single-object message"):
        decode(b"\x00garbage")


def test_unknown_fingerprint_is_named():
    with pytest.raises(UnknownSchemaError, match="unknown schema fingerprint 0102030405060708"):
        decode(MAGIC + bytes(range(1, 9)) + b"\x00")


def test_truncated_body_is_corrupt():
    data = encode(EXAMPLES[1])
    with pytest.raises(CorruptPayloadError, match="corrupt step"):
        decode(data[:-5])


def test_trailing_bytes_are_corrupt():
    with pytest.raises(CorruptPayloadError, match="trailing bytes"):
        decode(encode(EXAMPLES[1]) + b"\x00\x00")


def test_semantically_invalid_event_names_the_field():
    bad = Step.model_construct(**ENV, step=-1, event_id="e", ts_ms=1, extra={})
    for name in ("epoch", "loss", "learning_rate", "grad_norm", "tokens_per_s", "samples_per_s", "batch_time_s",
                 "tokens"):
        object.__setattr__(bad, name, None)
    with pytest.raises(InvalidEventError, match="step: Input should be greater than or equal to 0"):
        decode(encode(bad))


def test_pydantic_rejects_a_bad_status():
    with pytest.raises(ValueError, match="status"):
        RunEnded(**ENV, status="exploded")


floats = st.floats(allow_nan=True, allow_infinity=True) | st.none()


@hsettings(max_examples=200, deadline=None)
@given(step=st.integers(0, 2**62), loss=floats, lr=floats, gn=floats, tps=floats,
       extra=st.dictionaries(st.text(max_size=8), st.floats(allow_nan=True)),
       text=st.text(min_size=1).filter(str.strip))
def test_step_round_trips_for_any_values(step, loss, lr, gn, tps, extra, text):
    event = Step(run_id=text, experiment=text, seq=0, step=step, loss=loss, learning_rate=lr, grad_norm=gn,
                 tokens_per_s=tps, extra=extra)
    assert _same(decode(encode(event)).model_dump(), event.model_dump())


def _same(a, b) -> bool:
    """Equality in which NaN equals NaN (and nothing else)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def test_event_ids_are_random_uuid4():
    import uuid

    from trainwire.schemas.events import new_id

    ids = {new_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    assert all(uuid.UUID(i).version == 4 and str(uuid.UUID(i)) == i for i in list(ids)[:500])
