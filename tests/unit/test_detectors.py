import math

import pytest

from tests.detector_entries import ENTRIES, entry  # noqa: F401 (the fixture)
from trainwire.consumers.detectors import DetectorEngine, HistoryRequest, RunHistory
from trainwire.infra.detector_settings import DetectorSettings

pytestmark = pytest.mark.usefixtures("entry")  # each test, event by event and as frames (detector_entries.py)

RUN = {"run_id": "run-a", "experiment": "exp", "team": "", "ts_ms": 0, "seq": 0}


def steps(engine, losses, grad_norms=None, run=RUN):
    alerts = []
    for i, loss in enumerate(losses):
        record = {**run, "seq": i, "step": i + 1, "loss": loss,
                  "grad_norm": grad_norms[i] if grad_norms else 1.0}
        alerts += engine.observe("step", record)
    return alerts + engine.flush()


def judged(engine, kind, record):
    """The event's alerts, whichever entry the engine is fed through."""
    return engine.observe(kind, record) + engine.flush()


def healthy(n=200):
    return [0.4 + 2.5 * math.exp(-i / 50) * (1 + 0.01 * math.sin(i)) for i in range(n)]


def test_healthy_curve_is_silent():
    assert steps(DetectorEngine(), healthy()) == []


def test_nan_fires_once_per_incident_and_resolves():
    losses = healthy(20) + [math.nan] * 5 + healthy(40)[20:]
    alerts = [a for a in steps(DetectorEngine(), losses) if a.rule == "loss_not_finite"]
    assert [(a.state, a.step, a.severity) for a in alerts] == [("firing", 21, "block"), ("resolved", 26, "block")]
    assert alerts[0].dedup_key == alerts[1].dedup_key


def test_infinite_loss_is_not_finite():
    alerts = steps(DetectorEngine(), [1.0, math.inf])
    assert [a.rule for a in alerts] == ["loss_not_finite"]


def test_spike_over_half_above_recent_median_resolves_after_five_clear_steps():
    losses = [1.0] * 10 + [1.49, 1.6, 1.7] + [1.0] * 5
    alerts = [a for a in steps(DetectorEngine(), losses) if a.rule == "loss_spike"]
    assert [(a.state, a.step) for a in alerts] == [("firing", 12), ("resolved", 18)]
    assert alerts[0].threshold == 1.5 and alerts[0].value == 1.6


def test_grad_norm_above_ten_resolves_after_three_clear_steps():
    alerts = steps(DetectorEngine(), [1.0] * 6, grad_norms=[10.0, 10.5, 12.0, 3.0, 3.0, 3.0])
    assert [(a.rule, a.state, a.step) for a in alerts] == [
        ("grad_norm_high", "firing", 2), ("grad_norm_high", "resolved", 6)]


def test_noise_around_a_threshold_is_one_incident_not_a_page_per_crossing():
    norms = [9.0, 11.0] * 20 + [3.0] * 3
    alerts = steps(DetectorEngine(), [1.0] * len(norms), grad_norms=norms)
    assert [(a.rule, a.state, a.step) for a in alerts] == [
        ("grad_norm_high", "firing", 2), ("grad_norm_high", "resolved", len(norms))]


def noisy_tail(n: int, seed: int, floor: float = 0.02) -> list[float]:
    """A healthy fine-tune's loss: decaying to a small floor, ±8% relative noise and 0.01 absolute jitter."""
    import random

    rng = random.Random(seed)
    return [max(1e-4, (floor + 2.5 * math.exp(-i / (n / 6))) * (1 + rng.uniform(-0.08, 0.08))
                + rng.uniform(-0.01, 0.01)) for i in range(n)]


def sawtooth_tail(n: int) -> list[float]:
    """A decaying curve with a small saw-tooth (gradient accumulation, data order): relative jumps of ~60% once
    the loss is small."""
    return [0.01 + 2.0 * math.exp(-i / (n / 40)) + (0.012 if i % 4 == 0 else 0.0) for i in range(n)]


@pytest.mark.parametrize("losses", [noisy_tail(3_000, seed) for seed in range(3)] + [sawtooth_tail(20_000)],
                         ids=["noisy-0", "noisy-1", "noisy-2", "sawtooth"])
def test_a_healthy_run_ending_on_small_noisy_losses_pages_nothing(losses, entry):
    if ENTRIES[entry] and ENTRIES[entry] * 500 < len(losses):
        pytest.skip("thousands of small batches: the larger ones judge the same curve")
    assert steps(DetectorEngine(), losses) == []


def test_a_condition_must_hold_for_fire_after_readings_and_seconds():
    flat = [2.0] * 100  # underfitting: the loss never falls
    immediate = DetectorEngine(DetectorSettings.model_validate({"underfitting": {"fire_after": 1}}))
    first = [a.step for a in steps(immediate, flat) if a.rule == "underfitting"]
    default = [a.step for a in steps(DetectorEngine(), flat) if a.rule == "underfitting"]
    assert default == [first[0] + 24]  # the default holds it for 25 readings
    slow = DetectorEngine(DetectorSettings.model_validate({"grad_norm_high": {"fire_after_seconds": 5.0}}))
    records = [{**RUN, "seq": i, "ts_ms": i * 1_000, "step": i + 1, "loss": 1.0, "grad_norm": 50.0}
               for i in range(8)]
    fired = [a for r in records for a in slow.observe("step", r)] + slow.flush()
    assert [a.step for a in fired] == [6]  # held since step 1 (t=0 s), fires at t=5 s


def test_runs_are_independent():
    engine = DetectorEngine()
    steps(engine, [1.0] * 10)
    other = {**RUN, "run_id": "run-b"}
    assert steps(engine, [1.0, 1.7], run=other) == []  # run-b has no history yet: no spike baseline


def test_replayed_incident_has_the_same_alert_id():
    first = steps(DetectorEngine(), [1.0, math.nan])
    again = steps(DetectorEngine(), [1.0, math.nan])
    assert [a.event_id for a in first] == [a.event_id for a in again]


# ── rebuilding state for a run first seen under way ──────────────────────────────────────────────────────────


def test_a_run_first_seen_under_way_is_rebuilt_from_its_history():
    asked = []
    past = [("step", {**RUN, "host": "", "seq": i, "ts_ms": i, "step": i + 1, "loss": 1.0}) for i in range(10)]

    def history(request: HistoryRequest) -> RunHistory:
        asked.append(request)
        return RunHistory(past + [("step", {**RUN, "host": "", "seq": 10, "ts_ms": 10, "step": 11,
                                            "loss": math.nan})],
                          {"loss_not_finite": "run-a/loss_not_finite/11"})

    engine = DetectorEngine(history=history)
    record = {**RUN, "host": "", "seq": 11, "ts_ms": 11, "step": 12}
    still_nan = judged(engine, "step", {**record, "loss": math.nan})
    assert still_nan == []  # the open incident is adopted, not fired again
    assert asked[0].run_id == "run-a" and asked[0].seq == 11 and asked[0].steps >= 10
    spike = judged(engine, "step", {**record, "seq": 12, "step": 13, "loss": 1.7})
    assert [(a.rule, a.state, a.dedup_key) for a in spike] == [
        ("loss_not_finite", "resolved", "run-a/loss_not_finite/11"),
        ("loss_spike", "firing", "run-a/loss_spike/13")]  # the baseline of 1.0 came from history
    assert len(asked) == 1  # one load per run


def test_a_run_starting_here_reads_no_history():
    def history(request):
        raise AssertionError("a run_started has nothing before it")

    engine = DetectorEngine(history=history)
    assert judged(engine, "run_started", {**RUN, "host": "", "run_name": ""}) == []
    assert steps(engine, [1.0, 1.0]) == []


def test_forgetting_a_partition_drops_its_runs():
    loads = []
    engine = DetectorEngine(history=lambda request: loads.append(request) or RunHistory())
    engine.observe("step", {**RUN, "host": "", "step": 1, "loss": 1.0}, ("events", 3))
    engine.observe("step", {**RUN, "run_id": "run-b", "host": "", "step": 1, "loss": 1.0}, ("events", 4))
    engine.forget([("events", 3)])
    engine.tick(0)
    assert [a.run_id for a in engine.tick(60_000)] == ["run-b"]  # run-a's silence is not this consumer's concern
    engine.observe("step", {**RUN, "host": "", "seq": 1, "step": 2, "loss": 1.0}, ("events", 3))
    engine.flush()
    assert [r.run_id for r in loads] == ["run-a", "run-b", "run-a"]  # rebuilt when it comes back


def test_an_ended_run_is_never_stalled_and_its_post_training_eval_is_judged_as_such():
    """LLaMA-Factory (and `trainer.evaluate()` after `train()`) evaluates after the run ended: that eval must not
    bring the run back to life for the stall rule, which would page on-call ~15 s later for a finished run."""
    engine = DetectorEngine(history=lambda request: RunHistory())
    steps(engine, [1.0, 0.9, 0.8])
    assert judged(engine, "run_ended", {**RUN, "seq": 9, "ts_ms": 1_000, "status": "completed"}) == []
    assert judged(engine, "eval", {**RUN, "seq": 10, "ts_ms": 2_000, "step": 3, "eval_loss": 0.85}) == []
    engine.tick(3_000)
    assert engine.tick(600_000) == []


def test_an_ended_run_rebuilt_from_the_store_is_not_stalled_but_a_resumed_one_can_be():
    engine = DetectorEngine(history=lambda request: RunHistory(ended=True))  # a new consumer, after the end
    assert judged(engine, "eval", {**RUN, "seq": 10, "ts_ms": 2_000, "step": 3, "eval_loss": 0.85}) == []
    engine.tick(3_000)
    assert engine.tick(600_000) == []
    engine.observe("run_started", {**RUN, "seq": 11, "ts_ms": 700_000, "run_name": ""})  # resumed by a new process
    engine.observe("step", {**RUN, "seq": 12, "ts_ms": 701_000, "step": 4, "loss": 0.8})
    engine.tick(702_000)
    assert [a.rule for a in engine.tick(1_400_000)] == ["run_stalled"]


def test_a_stall_resolves_when_the_run_ends():
    engine = DetectorEngine()
    steps(engine, [1.0])
    engine.tick(0)
    (fired,) = engine.tick(600_000)
    (resolved,) = judged(engine, "run_ended", {**RUN, "seq": 9, "ts_ms": 601_000, "status": "failed"})
    assert (resolved.rule, resolved.state, resolved.dedup_key) == ("run_stalled", "resolved", fired.dedup_key)


# ── per-experiment settings ──────────────────────────────────────────────────────────────────────────────────


def test_experiment_overrides_apply_to_that_experiment_only():
    settings = DetectorSettings.model_validate({
        "grad_norm_high": {"max_grad_norm": 20.0},
        "experiments": {"long-context": {"grad_norm_high": {"max_grad_norm": 50.0},
                                         "loss_spike": {"enabled": False}}},
    })
    engine = DetectorEngine(settings)
    norms, losses = [15.0, 30.0, 60.0, 1.0], [1.0, 1.0, 1.0, 5.0]
    other = steps(engine, losses, grad_norms=norms, run={**RUN, "run_id": "other"})
    tuned = steps(engine, losses, grad_norms=norms, run={**RUN, "run_id": "tuned", "experiment": "long-context"})
    assert [(a.rule, a.state, a.step) for a in other] == [("grad_norm_high", "firing", 2), ("loss_spike", "firing", 4)]
    assert [(a.rule, a.state, a.step) for a in tuned] == [("grad_norm_high", "firing", 3)]
