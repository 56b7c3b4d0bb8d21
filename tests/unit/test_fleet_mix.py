"""The ingest benchmark's fleet (benchmarks/fleet_mix.py): its numbers are only worth quoting if the messages are
what the SDK would send — each kind in the stated proportion, on its topic, keyed by its run, numbered in order —
plus exactly the NaN losses and corrupt bodies it says it injects."""

import math
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from trainwire.consumers.detectors import DetectorEngine
from trainwire.infra.detector_settings import DetectorSettings
from trainwire.infra.log.topics import topic_for
from trainwire.schemas import CorruptPayloadError, decode_record

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from fleet_mix import CORRUPT, FleetMix, generate, kinds_of  # noqa: E402

END_MS = 1_700_000_000_000
MIX = FleetMix(runs=6, seconds=120, steps_per_s=2, gpus_per_job=4, nan_losses=3, corrupt_messages=5)


@pytest.fixture(scope="module")
def messages():
    return generate(MIX, END_MS)


def test_each_kind_comes_in_the_proportion_the_mix_states(messages):
    kinds = kinds_of(messages)
    steps = MIX.runs * MIX.seconds * MIX.steps_per_s
    assert kinds["step"] == steps
    assert kinds["gpu_sample"] == MIX.runs * MIX.gpus_per_job * MIX.seconds / MIX.gpu_sample_every_s
    assert kinds["heartbeat"] == MIX.runs * MIX.seconds / MIX.heartbeat_every_s
    # every job logs steps 0…239: an eval at each multiple of 50
    assert kinds["eval"] == MIX.runs * 5
    assert kinds[CORRUPT] == MIX.corrupt_messages
    assert sum(kinds.values()) == len(messages)


def test_every_message_is_keyed_by_its_run_on_its_kinds_topic_and_numbered_in_order(messages):
    last_seq: dict[str, int] = defaultdict(lambda: -1)
    last_ts = 0
    evals_at, steps_at = Counter(), Counter()
    for message in messages:
        assert message.ts_ms >= last_ts
        last_ts = message.ts_ms
        if message.kind == CORRUPT:
            continue
        kind, fields = decode_record(message.value)
        assert kind == message.kind and message.topic == topic_for(kind)
        assert message.key == fields["run_id"].encode()
        assert fields["seq"] > last_seq[fields["run_id"]]
        last_seq[fields["run_id"]] = fields["seq"]
        assert END_MS - MIX.seconds * 1000 <= fields["ts_ms"] <= END_MS
        if kind == "step":
            steps_at[(fields["run_id"], fields["step"])] += 1
        if kind == "eval":
            assert steps_at[(fields["run_id"], fields["step"])] == 1, "an eval comes after its step"
            assert fields["step"] % MIX.eval_every_steps == 0
            evals_at[fields["run_id"]] += 1
    assert len(last_seq) == MIX.runs and len(evals_at) == MIX.runs


def test_the_injected_faults_are_there_and_only_those(messages):
    nan_runs = [fields["run_id"] for kind, fields in
                (decode_record(m.value) for m in messages if m.kind == "step") if math.isnan(fields["loss"])]
    assert len(nan_runs) == len(set(nan_runs)) == MIX.nan_losses
    for message in messages:
        if message.kind == CORRUPT:
            with pytest.raises(CorruptPayloadError):
                decode_record(message.value)


def test_the_window_is_sized_by_the_events_asked_for():
    mix = FleetMix.for_events(50_000, runs=1_000)
    assert mix.runs * mix.seconds * mix.events_per_job_s() == pytest.approx(50_000)
    assert mix.describe()["fleet_events_per_s"] == round(1_000 * (1 + 1 / 50 + 8 / 5 + 1 / 5))


def test_the_fleet_is_healthy_to_the_detectors_but_for_the_nan_losses():
    """The benchmarks quote the detectors' cost on a healthy fleet; a fleet they page on is judged event by event
    (a firing incident is), so its numbers would be those of an alert storm. Every run is watched from its first
    step, as the store would hold it, for longer than the slowest rule's window (underfitting: 50 losses)."""
    mix = FleetMix(runs=40, seconds=400, nan_losses=4, corrupt_messages=0)
    engine = DetectorEngine(DetectorSettings())
    fired: Counter = Counter()
    for message in generate(mix, END_MS):
        kind, fields = decode_record(message.value)
        for alert in engine.observe(kind, fields):
            if alert.state == "firing":
                fired[alert.rule] += 1
    assert fired == {"loss_not_finite": mix.nan_losses}
