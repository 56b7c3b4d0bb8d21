"""Each rule of spec §4 fires on a crafted series, resolves when it clears, and stays quiet on real training.

The rules are judged here without hysteresis (fire and clear on the first reading), so that each test shows the
condition itself; test_detectors.py covers the hysteresis and the defaults it runs with.
"""

import math

import pytest

from tests.detector_entries import entry  # noqa: F401 (the fixture)
from trainwire.consumers.detectors import DetectorEngine
from trainwire.infra.detector_settings import DetectorParameters, DetectorSettings

pytestmark = pytest.mark.usefixtures("entry")  # each test, event by event and as frames (detector_entries.py)

IMMEDIATE = {rule: {"fire_after": 1, "clear_after": 1} for rule, info in DetectorParameters.model_fields.items()
             if "fire_after" in info.annotation.model_fields}


class Feed:
    """Events of one run into an engine, with the envelope, sequence numbers and timestamps (1 s apart)."""

    def __init__(self, engine=None, run_id="run-a", experiment="exp", host="node-1"):
        self.engine = engine or engine_with()
        self.envelope = {"run_id": run_id, "experiment": experiment, "team": "", "host": host}
        self.seq = 0
        self._alerts = []

    @property
    def alerts(self):
        """Every alert so far (the events still waiting for their batch judged first)."""
        self._alerts += self.engine.flush()
        return self._alerts

    def event(self, kind, **fields):
        return self.observe(kind, {**self.envelope, "seq": self.seq, "ts_ms": self.seq * 1000, **fields})

    def observe(self, kind, record):
        self.seq += 1
        self._alerts += self.engine.observe(kind, record)
        return record

    def steps(self, losses, start=1, **fields):
        for i, loss in enumerate(losses):
            self.event("step", step=start + i, loss=loss, **fields)

    def gpu(self, index=0, utilization=95.0, used=40_000.0, total=80_000.0, temperature=60.0):
        self.event("gpu_sample", rank=0, gpu_index=index, gpu_uuid=f"GPU-{index}", gpu_name="H100",
                   utilization_pct=utilization, memory_used_mb=used, memory_total_mb=total,
                   temperature_c=temperature)

    def of(self, rule):
        return [(a.state, a.step) for a in self.alerts if a.rule == rule]

    def first(self, rule):
        return next(a for a in self.alerts if a.rule == rule)


def engine_with(**rules):
    return DetectorEngine(DetectorSettings.model_validate({rule: IMMEDIATE[rule] | rules.get(rule, {})
                                                           for rule in IMMEDIATE} | {
        key: value for key, value in rules.items() if key not in IMMEDIATE}))


def falling(n, start=2.0, end=1.0):
    return [end + (start - end) * math.exp(-i / (n / 4)) for i in range(n)]


# ── evals ────────────────────────────────────────────────────────────────────────────────────────────────────


def test_overfitting_when_eval_loss_exceeds_one_and_a_half_times_train_loss():
    feed = Feed()
    feed.steps([1.0] * 5)
    feed.event("eval", step=5, eval_loss=1.4)
    feed.event("eval", step=6, eval_loss=1.6)
    feed.event("eval", step=7, eval_loss=1.2)
    assert feed.of("overfitting") == [("firing", 6), ("resolved", 7)]
    alert = feed.first("overfitting")
    assert alert.severity == "warning" and alert.value == 1.6 and alert.threshold == 1.5


def test_overfitting_when_eval_rises_while_train_falls_says_stop_and_names_the_best_checkpoint():
    feed = Feed()
    train = falling(60, 1.0, 0.7)
    for i, eval_loss in enumerate([0.90, 0.80, 0.82, 0.85, 0.88, 0.80]):
        step = 10 * (i + 1)
        feed.steps(train[step - 10:step], start=step - 9)
        feed.event("eval", step=step, eval_loss=eval_loss)
        feed.event("checkpoint", step=step, path=f"/ckpt/checkpoint-{step}", files=[], eval_loss=eval_loss,
                   is_best=eval_loss <= 0.80)
    assert feed.of("overfitting") == [("firing", 50), ("resolved", 60)]
    message = feed.first("overfitting").message
    assert "rose 3 evals in a row" in message and "stop here" in message
    assert "best checkpoint so far: /ckpt/checkpoint-20 (step 20, eval loss 0.8)" in message


def test_overfitting_names_the_checkpoint_at_the_lowest_eval_when_checkpoints_carry_no_eval_loss():
    feed = Feed()
    train = falling(50, 1.0, 0.7)
    for i, eval_loss in enumerate([0.9, 0.7, 0.75, 0.8, 0.85]):
        step = 10 * (i + 1)
        feed.steps(train[step - 10:step], start=step - 9)
        feed.event("eval", step=step, eval_loss=eval_loss)
        feed.event("checkpoint", step=step, path=f"/ckpt/{step}", files=[], eval_loss=None, is_best=None)
    assert "best checkpoint so far: /ckpt/20 (step 20, eval loss 0.7)" in feed.first("overfitting").message


def test_a_rising_eval_loss_while_train_loss_also_rises_is_not_overfitting():
    feed = Feed()
    for i, eval_loss in enumerate([0.8, 0.82, 0.85, 0.9]):
        feed.steps([0.7 + 0.02 * i] * 10, start=10 * i + 1)
        feed.event("eval", step=10 * (i + 1), eval_loss=eval_loss)
    assert feed.of("overfitting") == []


def test_generalization_gap_at_one_point_two():
    feed = Feed()
    feed.steps([1.0] * 5)
    feed.event("eval", step=5, eval_loss=1.19)
    feed.event("eval", step=6, eval_loss=1.2)
    feed.event("eval", step=7, eval_loss=1.1)
    assert feed.of("generalization_gap") == [("firing", 6), ("resolved", 7)]
    assert feed.first("generalization_gap").value == pytest.approx(1.2)


def test_perplexity_from_the_eval_loss_without_overflow():
    feed = Feed()
    feed.event("eval", step=1, eval_loss=4.6)  # e^4.6 ≈ 99.5
    feed.event("eval", step=2, eval_loss=1000.0)  # math.exp would overflow
    feed.event("eval", step=3, eval_loss=2.0)
    assert feed.of("perplexity_high") == [("firing", 2), ("resolved", 3)]
    assert feed.first("perplexity_high").value == math.inf


def test_a_reported_perplexity_wins_over_the_eval_loss():
    feed = Feed()
    feed.event("eval", step=1, eval_loss=1.0, perplexity=150.0)
    assert feed.of("perplexity_high") == [("firing", 1)] and feed.first("perplexity_high").value == 150.0


def test_eval_accuracy_below_its_baseline_and_silent_without_one():
    quiet = Feed()
    quiet.event("eval", step=1, eval_loss=1.0, eval_accuracy=0.01)
    assert quiet.of("eval_accuracy_low") == []
    feed = Feed(engine_with(eval_accuracy_low={"baseline": 0.6}))
    for step, accuracy in enumerate([0.7, 0.55, 0.58, 0.61], 1):
        feed.event("eval", step=step, eval_loss=1.0, eval_accuracy=accuracy)
    assert feed.of("eval_accuracy_low") == [("firing", 2), ("resolved", 4)]


# ── steps ────────────────────────────────────────────────────────────────────────────────────────────────────


def test_throughput_low_when_sustained_not_on_a_blip():
    feed = Feed()
    for step, tokens_per_s in enumerate([3000, 40, 3000, 3000, 3000, 50, 60, 70, 3000, 3000, 3000], 1):
        feed.event("step", step=step, loss=1.0, tokens_per_s=float(tokens_per_s))
    assert feed.of("throughput_low") == [("firing", 8), ("resolved", 11)]


def test_underfitting_when_the_loss_does_not_fall_from_its_start():
    feed = Feed(engine_with(underfitting={"window": 20}))
    feed.steps([2.0 + 0.01 * math.sin(i) for i in range(30)])
    feed.steps(falling(40, 2.0, 1.0), start=31)
    assert feed.of("underfitting") == [("firing", 20), ("resolved", 33)]


def test_a_converged_plateau_is_not_underfitting():
    feed = Feed()
    feed.steps(falling(40, 2.5, 1.0) + [1.0 + 0.01 * math.sin(i) for i in range(200)])
    assert feed.of("underfitting") == []


def test_loss_unstable_on_oscillation_and_not_on_a_steep_descent():
    feed = Feed()
    feed.steps(falling(30, 3.0, 1.0))
    feed.steps([1.0, 1.6] * 10, start=31)
    feed.steps([1.0] * 25, start=51)
    assert feed.of("loss_unstable") == [("firing", 42), ("resolved", 59)]
    assert feed.first("loss_unstable").severity == "warning"


# ── GPUs ─────────────────────────────────────────────────────────────────────────────────────────────────────


def test_gpu_memory_high_at_95_percent():
    feed = Feed()
    for used in (75_000.0, 76_000.0, 77_000.0, 60_000.0):
        feed.gpu(used=used, total=80_000.0)
    assert [a.state for a in feed.alerts if a.rule == "gpu_memory_high"] == ["firing", "resolved"]
    assert feed.first("gpu_memory_high").value == 76_000 / 80_000


def test_gpu_temperature_is_one_incident_per_run_until_every_gpu_cools():
    feed = Feed()
    feed.gpu(index=0, temperature=86.0)
    feed.gpu(index=1, temperature=90.0)
    feed.gpu(index=0, temperature=70.0)
    assert [a.state for a in feed.alerts] == ["firing"]  # GPU 1 is still hot
    feed.gpu(index=1, temperature=84.0)
    assert [a.state for a in feed.alerts] == ["firing", "resolved"]
    fired = feed.first("gpu_temperature_high")
    assert fired.severity == "critical" and "GPU 0 on node-1" in fired.message and fired.threshold == 85.0


def test_gpu_utilization_low_only_while_training_and_sustained():
    feed = Feed()
    for _ in range(10):
        feed.gpu(utilization=5.0)  # loading the model: no step yet
    feed.steps([1.0])
    for utilization in (30, 95, 95, 95, 95, 95, 30, 30, 30, 30, 95, 95, 95):
        feed.gpu(utilization=float(utilization))
    states = [(a.state, a.severity) for a in feed.alerts if a.rule == "gpu_utilization_low"]
    assert states == [("firing", "info"), ("resolved", "info")]


# ── time ─────────────────────────────────────────────────────────────────────────────────────────────────────


def heartbeats(feed, count, every_ms):
    for _ in range(count):
        feed.observe("heartbeat", {**feed.envelope, "seq": feed.seq, "ts_ms": feed.seq * every_ms, "step": None})


def test_run_stalled_after_three_expected_intervals_of_silence_and_resolved_by_the_next_event():
    feed = Feed()
    heartbeats(feed, 5, every_ms=5000)
    engine = feed.engine
    assert engine.tick(100_000) == []  # heard since the last tick
    assert engine.tick(115_000) == []  # 15 s = 3 × 5 s: not yet more
    stalled = engine.tick(116_000)
    assert [(a.rule, a.state, a.severity) for a in stalled] == [("run_stalled", "firing", "critical")]
    assert engine.tick(200_000) == []  # fires once
    heartbeats(feed, 1, every_ms=5000)
    assert [(a.rule, a.state, a.dedup_key) for a in feed.alerts] == [
        ("run_stalled", "resolved", stalled[0].dedup_key)]


def test_a_run_is_not_stalled_while_its_partition_has_records_the_consumer_has_not_read():
    """Catching up on a backlog, a consumer reads some partitions well before others: the runs on those waiting
    are silent only to it. Their silence counts from when it has read all their partition holds."""
    engine = engine_with()
    partition, other = ("trainwire.events", 3), ("trainwire.events", 4)
    for seq in range(5):
        engine.observe("heartbeat", {"run_id": "run-a", "experiment": "exp", "team": "", "host": "node-1",
                                     "seq": seq, "ts_ms": seq * 5000, "step": None}, partition)
    assert engine.tick(100_000) == []
    assert engine.tick(160_000, behind={partition}) == []  # a minute of silence, but its records wait unread
    assert engine.tick(175_000, behind={other}) == []  # read up since 160 s: 15 s is not yet more than 3 × 5 s
    assert [a.rule for a in engine.tick(176_000, behind={other})] == ["run_stalled"]


def test_the_expected_interval_is_learned_from_the_run():
    feed = Feed()
    heartbeats(feed, 5, every_ms=60_000)  # a run that reports once a minute
    feed.engine.tick(0)
    assert feed.engine.tick(120_000) == []
    assert [a.rule for a in feed.engine.tick(181_000)] == ["run_stalled"]


def test_an_ended_run_never_stalls():
    feed = Feed()
    heartbeats(feed, 3, every_ms=5000)
    feed.event("run_ended", status="completed")
    feed.engine.tick(0)
    assert feed.engine.tick(10_000_000) == []


# ── a real training loop ─────────────────────────────────────────────────────────────────────────────────────


def tiny_training_run(seed: int, steps: int = 300, logging_steps: int = 5, eval_steps: int = 25):
    """Train a small MLP classifier (4 overlapping classes, cross-entropy: a loss floor like a language model's)
    and record what a trainer reports: the mean train loss every `logging_steps`, an eval every `eval_steps`."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only contend
    try:
        return _train(torch, seed, steps, logging_steps, eval_steps)
    finally:
        torch.set_num_threads(threads)


def _train(torch, seed, steps, logging_steps, eval_steps):
    torch.manual_seed(seed)
    centers = 0.6 * torch.randn(4, 8)

    def batch(n):
        labels = torch.randint(0, 4, (n,))
        return centers[labels] + torch.randn(n, 8), labels

    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    held_out = batch(1024)
    events, losses = [], []
    for step in range(1, steps + 1):
        inputs, labels = batch(64)
        loss = torch.nn.functional.cross_entropy(model(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)
        optimizer.step()
        losses.append(loss.item())
        if step % logging_steps == 0:
            events.append(("step", {"step": step, "loss": sum(losses) / len(losses), "grad_norm": grad_norm.item(),
                                    "tokens_per_s": 2000.0, "learning_rate": 3e-3}))
            losses = []
        if step % eval_steps == 0:
            with torch.no_grad():
                logits = model(held_out[0])
                eval_loss = torch.nn.functional.cross_entropy(logits, held_out[1]).item()
                accuracy = (logits.argmax(1) == held_out[1]).float().mean().item()
            events.append(("eval", {"step": step, "eval_loss": eval_loss, "eval_accuracy": accuracy,
                                    "perplexity": math.exp(eval_loss)}))
            events.append(("checkpoint", {"step": step, "path": f"/ckpt/{step}", "files": [], "eval_loss": eval_loss,
                                          "is_best": None}))
    return events


@pytest.mark.parametrize("seed", range(3))
def test_a_real_training_curve_is_silent(seed):
    events = tiny_training_run(seed)
    feed = Feed(engine_with(eval_accuracy_low={"baseline": 0.3}))
    for kind, fields in events:
        feed.event(kind, **fields)
        if fields["step"] % 10 == 0:
            feed.gpu(utilization=93.0, used=61_000.0, total=81_920.0, temperature=66.0)
    steps = [f["loss"] for kind, f in events if kind == "step"]
    assert steps[-1] < 0.8 * steps[0]  # it did learn
    assert feed.alerts == []
