"""Runs every rule over each run's events in order and turns changes of condition into alerts.

Each (run, rule) has at most one open incident: it fires once the rule's condition has held for `fire_after` of
the rule's readings in a row (and `fire_after_seconds`), and resolves once it has been clear for `clear_after` in a
row, so noise around a threshold is one incident, not a page per crossing. Rules that cannot apply to an event
kind are never called for it (rules are indexed by kind). Rules are built per experiment from the deployment's
settings and the experiment's overrides.

Time-based detection (`run_stalled`) needs a clock: the ingest loop calls `tick(now_ms)` about once a second.

State survives a run's partition moving to another consumer, and a restart: the first time the engine sees a
run that is under way (any event but `run_started`), it asks the injected history loader for the run's recent
events and open incidents, replays the events through the rules without alerting, and adopts the incidents, so
an open incident neither fires again nor stays open forever.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from trainwire.infra.detector_settings import DetectorParameters, DetectorSettings
from trainwire.schemas import Alert

from .base import Finding, Rule, RunFacts, alert_id
from .catalog import rules_from
from .columnar import ColumnarObserver
from .eval_rules import REMEMBERED_CHECKPOINTS
from .history import HistoryLoader, HistoryRequest, RunHistory
from .stall import RunStalled

if TYPE_CHECKING:
    from trainwire.consumers.frames import Frame

STALLED = RunStalled.rule_id
ENDED_RUNS_KEPT = 1_000  # ended runs whose state is kept for their post-training events; older ones are rebuilt
_EVALS_REMEMBERED = 100  # evals read back on a rebuild: the rising streak and the best eval so far
_EVENTS_AGAIN = Finding(False, None, None, "the run sends events again")


@dataclass(frozen=True)
class _Hysteresis:
    fire_after: int
    fire_after_ms: float
    clear_after: int


class _Streak:
    """A (run, rule)'s current run of readings: how many in a row held (since when), how many in a row were clear."""

    __slots__ = ("active", "since", "quiet")

    def __init__(self) -> None:
        self.active = 0
        self.since = 0
        self.quiet = 0


@dataclass(frozen=True)
class _RuleSet:
    rules: tuple[Rule, ...]
    by_kind: dict[str, tuple[Rule, ...]]
    stall: RunStalled | None
    hysteresis: dict[str, _Hysteresis]

    @classmethod
    def of(cls, parameters: DetectorParameters) -> _RuleSet:
        rules = rules_from(parameters)
        kinds = {kind for rule in rules for kind in rule.kinds}
        stall = next((r for r in rules if isinstance(r, RunStalled)), None)
        hysteresis = {}
        for rule in rules:
            settings = getattr(parameters, rule.rule_id)
            hysteresis[rule.rule_id] = _Hysteresis(getattr(settings, "fire_after", 1),
                                                   getattr(settings, "fire_after_seconds", 0.0) * 1000.0,
                                                   getattr(settings, "clear_after", 1))
        return cls(tuple(rules), {k: tuple(r for r in rules if k in r.kinds) for k in kinds}, stall, hysteresis)


@dataclass(eq=False)
class _RunState:
    rules: _RuleSet
    experiment: str
    team: str
    rule_state: dict[str, Any]
    gaps: deque[int]  # recent gaps between the run's event timestamps (ms): its expected interval
    facts: RunFacts = field(default_factory=RunFacts)
    firing: dict[str, str] = field(default_factory=dict)  # rule id → dedup key of the open incident
    sources: set[Any] = field(default_factory=set)  # the partitions its events came from
    last_ts: int | None = None
    spoke: bool = True  # an event came since the last tick
    quiet_since: int = 0  # the first tick after its latest event
    # per kind: (rule, its state, its streak, its hysteresis)
    checks: dict[str, tuple[tuple[Rule, Any, _Streak, _Hysteresis], ...]] = field(default_factory=dict)
    ended: bool = False  # its run ended arrived: never stalled; later events (a final eval) are post-training

    def __post_init__(self) -> None:
        streaks = {rule.rule_id: _Streak() for rule in self.rules.rules}
        self.checks = {kind: tuple((rule, self.rule_state[rule.rule_id], streaks[rule.rule_id],
                                    self.rules.hysteresis[rule.rule_id]) for rule in rules)
                       for kind, rules in self.rules.by_kind.items()}


class DetectorEngine:
    def __init__(self, settings: DetectorSettings | None = None, history: HistoryLoader | None = None):
        self.settings = settings or DetectorSettings()
        self._history = history
        self._default_rules = _RuleSet.of(self.settings.deployment)
        self._experiment_rules = {name: _RuleSet.of(self.settings.for_experiment(name))
                                  for name in self.settings.experiments}
        self._runs: dict[str, _RunState] = {}
        self._ended: dict[str, None] = {}  # ended runs still in _runs, oldest first
        self._prefetched: dict[str, RunHistory] = {}
        self._history_sizes = _history_sizes(
            [self.settings.deployment, *(self.settings.for_experiment(name) for name in self.settings.experiments)])
        self.failures = 0  # events whose detection raised in observe_frames (they are stored all the same)
        self.fallbacks = 0  # bulk verdicts that raised in observe_frames (their rows were judged event by event)

    def observe(self, kind: str, record: dict, source: Any = None) -> list[Alert]:
        """The alerts this event raises or resolves. `source` (e.g. its partition) lets `forget` drop runs."""
        if kind == "run_ended":
            return self._end(record, source)
        run = self._runs.get(record["run_id"])
        if run is None:
            run = self._start(kind, record, source)
        elif source is not None and source not in run.sources:
            run.sources.add(source)
        if kind == "run_started" and run.ended:  # resumed by a new process: alive again
            run.ended = False
            self._ended.pop(record["run_id"], None)
        alerts: list[Alert] = []
        if kind != "gpu_sample" and not run.ended:  # liveness: see stall.py
            ts, last = record["ts_ms"], run.last_ts
            if last is None or ts > last:
                if last is not None:
                    run.gaps.append(ts - last)
                run.last_ts = ts
            run.spoke = True
            if STALLED in run.firing:
                alerts.append(self._alert(run.rules.stall or RunStalled, record, _EVENTS_AGAIN,
                                          run.firing.pop(STALLED), "resolved"))
        self._detect(run, kind, record, alerts)
        return alerts

    def observe_frames(self, frames: Mapping[str, Frame], sources: Sequence[Any] | None = None) -> list[Alert]:
        """The alerts of a whole batch, given as columns (`sources[position]`: the source of the batch's record
        at that position): the same, in the same order, as `observe` on every frame row in batch order would
        return, and the same state after. The history of runs met for the first time is loaded at once, as
        `prefetch` does. An event whose detection raises is counted in `failures` and logged, and the batch goes
        on; HistoryUnavailableError propagates. How: columnar.py."""
        if not any(frame.table.num_rows for frame in frames.values()):
            self.prefetch(())
            return []
        return ColumnarObserver(self, frames, sources).observe()

    def tick(self, now_ms: int, behind: Collection[Any] = ()) -> list[Alert]:
        """Judge silence: a run that has sent nothing for `factor` × its expected interval is stalled. `behind`:
        the sources (partitions) holding records not read yet; a run with one is silent only to this consumer,
        so its silence counts from when they are read."""
        alerts = []
        for run_id, run in self._runs.items():
            stall = run.rules.stall
            if stall is None or run.ended:
                continue
            if run.spoke or (behind and not run.sources.isdisjoint(behind)):
                run.spoke, run.quiet_since = False, now_ms
                continue
            if STALLED in run.firing:
                continue
            silent, expected = now_ms - run.quiet_since, stall.expected_ms(run.gaps)
            if silent > stall.factor * expected:
                key = f"{run_id}/{STALLED}/after-{run.last_ts}"
                run.firing[STALLED] = key
                anchor = {"run_id": run_id, "experiment": run.experiment, "team": run.team, "ts_ms": now_ms,
                          "step": run.facts.last_step}
                finding = Finding(True, silent / 1000, stall.factor * expected / 1000,
                                  stall.message(silent, expected))
                alerts.append(self._alert(stall, anchor, finding, key, "firing"))
        return alerts

    def forget(self, sources: Iterable[Any]) -> None:
        """Drop the runs whose events came from these sources (partitions this consumer no longer owns)."""
        gone = set(sources)
        for run_id in [run_id for run_id, run in self._runs.items() if run.sources & gone]:
            del self._runs[run_id]
            self._ended.pop(run_id, None)

    def forget_all(self) -> None:
        """Drop every run's state: each is rebuilt from history when its next event comes (after a rewind)."""
        self._runs.clear()
        self._ended.clear()
        self._prefetched.clear()

    def prefetch(self, events: Iterable[tuple[str, dict]]) -> None:
        """Load at once the history of every run these events (one poll's, in order) will be first to show.

        After a restart or a rebalance a consumer meets many runs under way at once; one query per table for all
        of them instead of five per run keeps it from stalling. Call `observe` for the same events next."""
        load_many = getattr(self._history, "load_many", None)
        if load_many is None:
            return
        self._prefetched.clear()
        first: dict[str, HistoryRequest | None] = {}
        for kind, record in events:
            run_id = record["run_id"]
            if run_id in self._runs or run_id in first:
                continue
            first[run_id] = None if kind == "run_started" else self._request(record)
        requests = [request for request in first.values() if request is not None]
        if len(requests) > 1:
            self._prefetched = load_many(requests)

    def _request(self, record: dict) -> HistoryRequest:
        return HistoryRequest(record["run_id"], record.get("host", ""), record["seq"], record["ts_ms"],
                              **self._history_sizes)

    def _start(self, kind: str, record: dict, source: Any) -> _RunState:
        rules = self._experiment_rules.get(record["experiment"], self._default_rules)
        run = _RunState(rules, record["experiment"], record.get("team", ""),
                        {rule.rule_id: rule.new_state() for rule in rules.rules},
                        deque(maxlen=rules.stall.window if rules.stall else 1))
        if self._history is not None and kind != "run_started":  # a run's first event has no history
            history = self._prefetched.pop(record["run_id"], None)
            if history is None:
                history = self._history(self._request(record))
            for past_kind, past in history.events:
                self._detect(run, past_kind, past, None)
            run.firing.update((rule_id, key) for rule_id, key in history.open_incidents.items()
                              if rule_id in run.rule_state)
            run.ended = history.ended
        if source is not None:
            run.sources.add(source)
        self._runs[record["run_id"]] = run
        return run

    def _end(self, record: dict, source: Any) -> list[Alert]:
        """The run is over: it is never stalled again, and events after this one (an evaluation or a save after
        training, as LLaMA-Factory and `trainer.evaluate()` after `train()` make) are judged as post-training."""
        run_id = record["run_id"]
        run = self._runs.get(run_id)
        if run is None:  # a stall incident opened before a restart still closes
            run = self._start("run_ended", record, source)
        run.ended = True
        self._ended.pop(run_id, None)
        self._ended[run_id] = None
        if len(self._ended) > ENDED_RUNS_KEPT:  # the oldest is rebuilt from the store if it ever speaks again
            oldest = next(iter(self._ended))
            del self._ended[oldest], self._runs[oldest]
        if STALLED not in run.firing:
            return []
        return [self._alert(run.rules.stall or RunStalled, record, _EVENTS_AGAIN, run.firing.pop(STALLED),
                            "resolved")]

    def _detect(self, run: _RunState, kind: str, record: dict, alerts: list[Alert] | None) -> None:
        """Run the kind's rules; append the alerts, or only update state when replaying history (None)."""
        if kind == "step":
            facts = run.facts
            facts.last_step = record["step"]
            loss = record.get("loss")
            if loss is not None and math.isfinite(loss):
                facts.recent_losses.add(loss)
        firing, facts = run.firing, run.facts
        for rule, state, streak, hysteresis in run.checks.get(kind, ()):
            finding = rule.check(record, state, facts)
            if finding is None:
                continue
            if finding.active:
                streak.quiet = 0
                if not streak.active:
                    streak.since = record["ts_ms"]
                streak.active += 1
                if (alerts is None or rule.rule_id in firing or streak.active < hysteresis.fire_after
                        or record["ts_ms"] - streak.since < hysteresis.fire_after_ms):
                    continue
                step = record.get("step")
                anchor = step if step is not None else f"{record.get('host', '')}@{record['seq']}"
                key = firing[rule.rule_id] = f"{record['run_id']}/{rule.rule_id}/{anchor}"
                alerts.append(self._alert(rule, record, finding, key, "firing"))
            else:
                streak.active = 0
                if not firing or rule.rule_id not in firing:
                    continue
                streak.quiet += 1
                if alerts is not None and streak.quiet >= hysteresis.clear_after:
                    streak.quiet = 0
                    alerts.append(self._alert(rule, record, finding, firing.pop(rule.rule_id), "resolved"))

    @staticmethod
    def _alert(rule: Rule | type[Rule], record: dict, finding: Finding, key: str, state: str) -> Alert:
        value = finding.value
        if value is None and not finding.active and rule.field:
            value = record.get(rule.field)
        return Alert(
            event_id=alert_id(key, state),
            run_id=record["run_id"], experiment=record["experiment"], team=record.get("team", ""),
            ts_ms=record["ts_ms"], rule=rule.rule_id, severity=rule.severity, state=state,
            step=record.get("step"), value=value, threshold=finding.threshold,
            message=finding.message or f"{rule.rule_id} cleared", dedup_key=key,
        )


def _history_sizes(parameter_sets: list[DetectorParameters]) -> dict[str, int]:
    """How much history a rebuild reads: enough to fill every rule's window under any experiment's settings."""
    return {
        "steps": max(max(p.loss_spike.window, p.throughput_low.window, p.underfitting.window,
                          p.loss_unstable.window) + 1 for p in parameter_sets),
        "first_steps": max(p.underfitting.window // 2 for p in parameter_sets),
        "evals": max(max(p.overfitting.rising_evals + 1, _EVALS_REMEMBERED) for p in parameter_sets),
        "checkpoints": REMEMBERED_CHECKPOINTS,
        "gpu_samples": max(p.gpu_utilization_low.window for p in parameter_sets),
    }
