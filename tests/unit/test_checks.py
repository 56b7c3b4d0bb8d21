"""The ingest's fast record checks agree with the pydantic models, which stay the authority."""

import pytest
from hypothesis import given, settings, strategies as st

from trainwire.schemas import EVENT_TYPES, InvalidEventError, Step, validate
from trainwire.schemas.checks import check_record

BASE = Step(run_id="r", experiment="e", seq=0, step=0).model_dump()


def pydantic_accepts(kind: str, record: dict) -> bool:
    try:
        validate(kind, record)
    except InvalidEventError:
        return False
    return True


def fast_accepts(kind: str, record: dict) -> bool:
    try:
        check_record(kind, record)
    except InvalidEventError:
        return False
    return True


@settings(max_examples=300, deadline=None)
@given(step=st.integers(-3, 3), seq=st.integers(-3, 3), tokens=st.none() | st.integers(-3, 3),
       ts_ms=st.integers(-3, 3), run_id=st.sampled_from(["r", "", "  ", "run-1"]),
       experiment=st.sampled_from(["e", "", "\t"]))
def test_step_checks_agree_with_pydantic(step, seq, tokens, ts_ms, run_id, experiment):
    record = {**BASE, "step": step, "seq": seq, "tokens": tokens, "ts_ms": ts_ms, "run_id": run_id,
              "experiment": experiment}
    assert fast_accepts("step", record) == pydantic_accepts("step", record)


@pytest.mark.parametrize("kind, field, bad", [
    ("gpu_sample", "gpu_index", -1), ("gpu_sample", "rank", -2), ("heartbeat", "step", -1),
    ("run_started", "dataset_samples", -5), ("alert", "severity", "meh"), ("alert", "state", "gone"),
    ("eval", "step", -1),
])
def test_each_constraint_is_enforced_with_pydantics_message(kind, field, bad):
    valid = {"gpu_sample": {"gpu_index": 0, "gpu_uuid": "GPU-1"}, "alert": {
        "rule": "r", "severity": "warning", "state": "firing", "dedup_key": "k"}, "eval": {"step": 1},
        "heartbeat": {}, "run_started": {}}[kind]
    base = {"run_id": "r", "experiment": "e", "seq": 0} if kind != "alert" else {"run_id": "r", "experiment": "e"}
    record = EVENT_TYPES[kind](**base, **valid).model_dump()
    check_record(kind, record)
    with pytest.raises(InvalidEventError, match=field):
        check_record(kind, {**record, field: bad})
