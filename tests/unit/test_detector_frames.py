"""The columnar entry (`observe_frames`) is the per-event one (`observe` on each row in batch order) to the bit:
same alerts in the same order, same history loads, same state after every batch, so later events are judged the
same. Checked on random fleets: runs met under way (history) or from their start, several experiments with their
own windows, NaN/±Inf/None readings, spikes, plateaus, oscillations, hot, full and idle GPUs, evals and
checkpoints, ends, post-training evals and resumes, ticks, lost partitions, random batch splits."""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import fields, is_dataclass

import pytest

from tests.frame_builder import decoded_of
from trainwire.consumers.detectors import DetectorEngine, HistoryRequest, HistoryUnavailableError, RunHistory
from trainwire.consumers.detectors.base import Rolling
from trainwire.consumers.detectors.rules import GradNormHigh, LossSpike
from trainwire.infra.detector_settings import DetectorSettings
from trainwire.schemas import Checkpoint, Eval, GpuSample, Heartbeat, RunEnded, RunStarted, Step, decode_record, encode

SMALL_WINDOWS = {  # small enough that short runs warm up and reach the bulk path, and its edges
    "loss_spike": {"window": 6, "min_history": 3},
    "underfitting": {"window": 10, "fire_after": 3, "clear_after": 2},
    "loss_unstable": {"window": 6, "fire_after": 2, "clear_after": 3},
    "throughput_low": {"window": 4, "clear_after": 2},
    "gpu_utilization_low": {"window": 4, "clear_after": 2, "fire_after": 2},
    "gpu_memory_high": {"fire_after": 2},  # a GPU affected before its incident fires
    "grad_norm_high": {"fire_after_seconds": 2.0},
    "eval_accuracy_low": {"baseline": 0.5},
}
SETTINGS = [
    DetectorSettings(),
    DetectorSettings.model_validate({**SMALL_WINDOWS, "experiments": {
        "tuned": {"loss_spike": {"window": 3, "min_history": 5, "factor": 1.2},  # never enough history
                  "underfitting": {"window": 5, "min_decrease": 0.2},
                  "gpu_memory_high": {"enabled": False}, "loss_not_finite": {"fire_after": 3}},
        "quiet": {rule: {"enabled": False} for rule in ("loss_spike", "underfitting", "loss_unstable",
                                                        "throughput_low", "gpu_utilization_low")},
    }}),
]


class Run:
    """One run's events, made up at random: each run has its own character (noise, faults, GPUs, hosts)."""

    def __init__(self, rng: random.Random, index: int, ts: int):
        self.rng = rng
        self.envelope = {"run_id": f"run-{index}", "experiment": rng.choice(["base", "tuned", "quiet", "base"]),
                         "team": "t", "host": f"node-{index % 3}"}
        self.seq, self.ts, self.step = 0, ts, 0
        self.loss = rng.uniform(0.5, 3.0)
        self.noise = rng.choice([0.0, 0.01, 0.1, 0.4])
        self.faults = rng.random() < 0.5
        self.gpus = [(rng.choice([self.envelope["host"], "node-x"]), index, rng.choice(["", f"GPU-{index}"]))
                     for index in range(rng.randint(0, 3))]
        self.idle = {gpu: rng.random() < 0.2 for gpu in self.gpus}

    def _event(self, model, **values):
        self.seq += 1
        self.ts += self.rng.choice([0, 300, 1000, 1000, 2500, -200])  # equal and out-of-order stamps too
        self.ts = max(self.ts, 0)
        return model(**{**self.envelope, **values}, seq=self.seq, ts_ms=self.ts)

    def _reading(self, usual, odd=(math.nan, None)):
        return self.rng.choice(odd) if self.faults and self.rng.random() < 0.05 else usual

    def next(self):
        rng = self.rng
        roll = rng.random()
        if roll < 0.45:
            self.step += 1
            self.loss = max(0.01, self.loss * rng.uniform(0.97, 1.0))
            loss = self.loss * (1 + rng.uniform(-self.noise, self.noise))
            if self.faults and rng.random() < 0.08:
                loss = rng.choice([math.nan, math.inf, -math.inf, None, loss * 4, loss * 1.6, 0.0, -1.0])
            return self._event(Step, step=self.step, loss=loss,
                               grad_norm=self._reading(rng.choice([1.0, 2.0, 9.9]), (50.0, math.inf, math.nan, None)),
                               tokens_per_s=self._reading(rng.choice([3000.0, 2900.0, 80.0 if self.faults else 3000.0]),
                                                          (math.nan, None, 10.0)))
        if roll < 0.8 and self.gpus:
            host, index, uuid = rng.choice(self.gpus)
            idle = self.idle[(host, index, uuid)] or (self.faults and rng.random() < 0.1)
            return self._event(GpuSample, host=host, gpu_index=index, gpu_uuid=uuid,
                               utilization_pct=self._reading(rng.uniform(0, 30) if idle else rng.uniform(75, 100)),
                               memory_used_mb=self._reading(rng.choice([40_000.0, 79_000.0 if self.faults else 1.0])),
                               memory_total_mb=self._reading(80_000.0, (0.0, -1.0, math.nan, None)),
                               temperature_c=self._reading(rng.choice([60.0, 70.0, 90.0 if self.faults else 61.0])))
        if roll < 0.88:
            return self._event(Heartbeat, step=rng.choice([None, self.step]))
        if roll < 0.95:
            eval_loss = self._reading(self.loss * rng.choice([1.0, 1.1, 1.3, 2.0]), (math.nan, None, 800.0))
            return self._event(Eval, step=self.step, eval_loss=eval_loss,
                               eval_accuracy=rng.choice([None, 0.4, 0.7]), perplexity=rng.choice([None, None, 150.0]))
        return self._event(Checkpoint, step=self.step, path=f"/ckpt/{self.step}",
                           eval_loss=rng.choice([None, self.loss]), is_best=rng.choice([None, True, False]))


class History:
    """The store's view of the runs met under way: some past events (replayed without alerting), maybe an open
    incident, maybe an end; every load is noted."""

    def __init__(self, pasts: dict[str, RunHistory]):
        self.pasts = pasts
        self.loads: list[tuple[str, ...]] = []

    def __call__(self, request: HistoryRequest) -> RunHistory:
        self.loads.append((request.run_id,))
        return self.pasts.get(request.run_id, RunHistory())

    def load_many(self, requests: list[HistoryRequest]) -> dict[str, RunHistory]:
        self.loads.append(tuple(request.run_id for request in requests))
        return {request.run_id: self.pasts.get(request.run_id, RunHistory()) for request in requests}


def fleet(seed: int) -> tuple[list, list, dict[str, RunHistory]]:
    """(events in batch order, tail events, the runs' histories)."""
    rng = random.Random(seed)
    runs = [Run(rng, index, ts=rng.randint(0, 50_000)) for index in range(rng.randint(2, 7))]
    pasts, streams = {}, []
    for run in runs:
        under_way = rng.random() < 0.5
        past = [run.next() for _ in range(rng.randint(0, 40))]
        stream = [] if under_way else [run._event(RunStarted)]
        if under_way:
            open_rules = ({"loss_not_finite": f"{run.envelope['run_id']}/loss_not_finite/1"}
                          if rng.random() < 0.3 else {})
            pasts[run.envelope["run_id"]] = RunHistory([(e.kind, e.model_dump()) for e in past], open_rules,
                                                       ended=rng.random() < 0.15)
        else:
            stream += past
        stream += [run.next() for _ in range(rng.randint(20, 160))]
        if rng.random() < 0.3:
            stream.append(run._event(RunEnded, status="completed"))
            stream += [run.next() for _ in range(rng.randint(0, 3))]  # post-training evals and such
            if rng.random() < 0.5:
                stream.append(run._event(RunStarted))  # resumed
                stream += [run.next() for _ in range(rng.randint(0, 20))]
        streams.append(deque(stream))
    events = []
    while any(streams):
        events.append(rng.choice([s for s in streams if s]).popleft())
    tail = [run.next() for run in runs for _ in range(30)]
    rng.shuffle(tail)
    return events, tail, pasts


def source_of(event) -> tuple[str, int]:
    return ("gpu" if event.kind == "gpu_sample" else "events", int(event.run_id.split("-")[1]) % 3)


def state(engine: DetectorEngine):
    """Everything the engine keeps, as plain values: floats by their bits, with types, in order."""
    return plain({"runs": engine._runs, "ended": list(engine._ended), "failures": engine.failures})


def plain(value):
    if isinstance(value, float):
        return "float", value.hex()
    if value is None or isinstance(value, (bool, int, str)):
        return type(value).__name__, value
    if isinstance(value, deque):
        return "deque", value.maxlen, [plain(v) for v in value]
    if isinstance(value, (list, tuple)):
        return type(value).__name__, [plain(v) for v in value]
    if isinstance(value, dict):
        return type(value).__name__, [(plain(k), plain(v)) for k, v in value.items()]
    if isinstance(value, (set, frozenset)):
        return "set", sorted(repr(plain(v)) for v in value)
    if isinstance(value, Rolling) or hasattr(value, "__slots__"):
        names = [n for cls in type(value).__mro__ for n in getattr(cls, "__slots__", ())]
        return type(value).__name__, [(n, plain(getattr(value, n))) for n in names]
    if is_dataclass(value):
        if hasattr(value, "rule_id"):  # a rule: its parameters are the settings'
            return "rule", value.rule_id
        if type(value).__name__ == "_RuleSet":
            return "rules", [rule.rule_id for rule in value.rules]
        return type(value).__name__, [(f.name, plain(getattr(value, f.name))) for f in fields(value)]
    raise TypeError(f"no plain form for {type(value)}")


def batches(rng: random.Random, events: list) -> list[list]:
    out, start = [], 0
    while start < len(events):
        size = rng.choice([1, 2, 5, 13, 40, 200])
        out.append(events[start:start + size])
        start += size
    return out


def observe_each(engine: DetectorEngine, events: list) -> list:
    """What the per-record ingest path does with a batch: prefetch, then observe each event, a failing one's
    alerts lost but ingest going on."""
    decoded = [decode_record(encode(event)) for event in events]
    engine.prefetch(decoded)
    alerts = []
    for event, (kind, record) in zip(events, decoded):
        try:
            alerts += engine.observe(kind, record, source_of(event))
        except HistoryUnavailableError:
            raise
        except Exception:
            engine.failures += 1
    return alerts


def observe_framed(engine: DetectorEngine, events: list) -> list:
    return engine.observe_frames(decoded_of(events).frames, [source_of(event) for event in events])


def same(alerts) -> list[str]:
    return [repr(alert) for alert in alerts]  # repr: NaN values compare equal


def compare(seed: int, settings: DetectorSettings) -> dict[str, int]:
    rng = random.Random(seed)
    events, tail, pasts = fleet(seed)
    histories = History(pasts), History(pasts)
    each, framed = (DetectorEngine(settings, history=history) for history in histories)
    counts = {"alerts": 0, "batches": 0}
    now = 100_000
    for batch in batches(rng, events):
        expected = observe_each(each, batch)
        assert same(observe_framed(framed, batch)) == same(expected)
        assert histories[1].loads == histories[0].loads
        assert state(framed) == state(each)
        counts["alerts"] += len(expected)
        counts["batches"] += 1
        if rng.random() < 0.2:
            now += rng.choice([1_000, 30_000, 400_000])
            assert same(framed.tick(now)) == same(each.tick(now))
        if rng.random() < 0.05:
            lost = [("events", rng.randint(0, 2))]
            each.forget(lost)
            framed.forget(lost)
    for event in tail:  # on from there event by event: the state left behind judges alike
        assert same(observe_each(framed, [event])) == same(observe_each(each, [event]))
    return counts


@pytest.mark.parametrize("settings", SETTINGS, ids=["defaults", "small-windows"])
def test_random_fleets_are_judged_alike_by_both_entries(settings):
    totals = {"alerts": 0, "batches": 0}
    for seed in range(20):
        for key, count in compare(seed, settings).items():
            totals[key] += count
    assert totals["alerts"] > 100  # the fleets do raise and resolve incidents: the comparison says something


def test_a_healthy_fleet_goes_through_the_bulk_path():
    """The point of the columnar entry: warm, quiet runs are not judged event by event."""
    settings = DetectorSettings.model_validate(SMALL_WINDOWS)
    engine = DetectorEngine(settings)
    judged = []
    original = engine._detect
    engine._detect = lambda run, kind, record, alerts: (judged.append(kind), original(run, kind, record, alerts))
    envelopes = [{"run_id": f"run-{index}", "experiment": "e", "host": "h"} for index in range(20)]
    events = [RunStarted(**envelope, seq=0, ts_ms=0) for envelope in envelopes]
    for step in range(1, 61):
        for envelope in envelopes:
            events.append(Step(**envelope, seq=step, ts_ms=step * 1000, step=step, loss=2.0 / step ** 0.3,
                               grad_norm=1.0, tokens_per_s=3000.0))
            events += [GpuSample(**envelope, seq=step, ts_ms=step * 1000, gpu_index=g, gpu_uuid=f"G{g}",
                                 utilization_pct=95.0, memory_used_mb=1.0, memory_total_mb=2.0, temperature_c=60.0)
                       for g in range(2)]
    first, rest = events[:len(events) // 2], events[len(events) // 2:]
    observe_framed(engine, first)
    judged.clear()
    assert observe_framed(engine, rest) == []
    assert judged == []


def test_a_failing_rule_costs_its_events_and_nothing_else(monkeypatch):
    """A detector bug on one event is counted and the batch goes on, as the per-event pipeline does; the
    other runs' alerts still come."""
    check = GradNormHigh.check

    def broken(self, record, state, run):
        if record.get("grad_norm") == 13.0:
            raise RuntimeError("a bug")
        return check(self, record, state, run)

    monkeypatch.setattr(GradNormHigh, "check", broken)
    events = [Step(run_id=f"run-{i}", experiment="e", seq=s, ts_ms=s, step=s, loss=1.0 if s < 8 else math.nan,
                   grad_norm=13.0 if (i, s) == (0, 3) else 1.0) for s in range(10) for i in range(3)]
    each, framed = DetectorEngine(), DetectorEngine()
    expected = observe_each(each, events)
    assert same(observe_framed(framed, events)) == same(expected)
    assert framed.failures == each.failures == 1
    assert {a.run_id for a in expected if a.rule == "loss_not_finite"} == {"run-0", "run-1", "run-2"}


def test_a_failing_bulk_verdict_falls_back_to_judging_event_by_event(monkeypatch):
    def broken(self, rows, states):
        raise RuntimeError("a bug")

    events, _, pasts = fleet(3)
    each, framed = DetectorEngine(history=History(pasts)), DetectorEngine(history=History(pasts))
    monkeypatch.setattr(LossSpike, "bulk", broken)
    for batch in batches(random.Random(3), events):
        assert same(observe_framed(framed, batch)) == same(observe_each(each, batch))
    assert state(framed) == state(each)
    assert framed.fallbacks > 0


def test_an_unreadable_store_stops_the_batch():
    def history(request):
        raise HistoryUnavailableError("store down")

    engine = DetectorEngine(history=history)
    with pytest.raises(HistoryUnavailableError):
        observe_framed(engine, [Step(run_id="run-1", experiment="e", seq=1, step=1, loss=1.0)])
