"""The detectors' columnar entry (`DetectorEngine.observe_frames`): a batch's frames judged at once, with exactly
the alerts, in the same order, and the state that observing each row in turn would give.

Almost every run's share of a batch in a healthy fleet is quiet, so that case is made cheap:
- runs the batch must judge event by event are: runs met for the first time (their history is loaded, one
  `load_many` for all of them, as `prefetch` does), ended runs, runs with a run ended in the batch (it may evict
  another ended run: these go in batch order) and runs with an open stall incident (their next event resolves it);
- the other runs' liveness (last timestamp, gaps, sources) is brought forward over their rows at once;
- for each hot kind (steps, GPU samples), every rule gives a bulk verdict (`Rule.bulk`) from the batch's start
  state without changing it; where all vouch that no reading would be active and no incident of the kind is open,
  their state is brought forward at once, else that kind's rows of the run are judged event by event;
- rows of other kinds with rules (evals, checkpoints) are judged event by event at their place in the run's
  order, after the run's facts took the steps before them (an eval is compared with the train loss logged
  before it). Nothing else crosses kinds: step rules read only steps, GPU rules only samples and whether the
  run has logged a step (a run whose first step is in the batch has its samples judged event by event).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from itertools import compress, groupby
from operator import attrgetter, itemgetter
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from trainwire.consumers.frames import Frame
from trainwire.schemas import Alert

from .columns import FrameColumns, RunRows, extend_all
from .history import HistoryUnavailableError
from .stall import RunStalled

if TYPE_CHECKING:
    from .engine import DetectorEngine, _RunState

log = logging.getLogger(__name__)
STALLED = RunStalled.rule_id
HOT_KINDS = ("step", "gpu_sample")  # the kinds whose rules judge in bulk; GPU samples do not make a run live
_LIVENESS_EXEMPT = "gpu_sample"
_NO_TIME = np.iinfo(np.int64).min  # a run that has not spoken yet
_STATE, _STREAK = itemgetter(1), itemgetter(2)  # of a run's checks: (rule, state, streak, hysteresis)
_FIRING = attrgetter("firing")


class _Batch:
    """Every frame row in batch order: its kind, row in its frame, position, run and timestamp."""

    def __init__(self, frames: Mapping[str, Frame]):
        present = [frame for frame in frames.values() if frame.table.num_rows]
        self.kinds = [frame.kind for frame in present]
        self.frames = present
        self.columns = [FrameColumns(frame.table) for frame in present]
        run_ids = pa.concat_arrays([chunk for frame in present for chunk in frame.table.column("run_id").chunks])
        encoded = run_ids.dictionary_encode()
        sizes = [frame.table.num_rows for frame in present]
        order = np.argsort(np.concatenate([frame.positions for frame in present]), kind="stable")
        self.kind = np.repeat(np.arange(len(present), dtype=np.int32), sizes)[order]
        self.row = np.concatenate([np.arange(size, dtype=np.int64) for size in sizes])[order]
        self.position = np.concatenate([frame.positions for frame in present])[order]
        self.ts = np.concatenate([column.values("ts_ms") for column in self.columns])[order]
        self.run = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)[order]
        self.run_ids: list[str] = encoded.dictionary.to_pylist()
        self.by_run = np.argsort(self.run, kind="stable")  # rows grouped by run, each run's in batch order
        self.run_starts = np.concatenate([[0], np.cumsum(np.bincount(self.run, minlength=len(self.run_ids)))])
        self._records: dict[int, dict] = {}

    def of_kind(self, kind: str) -> int | None:
        return self.kinds.index(kind) if kind in self.kinds else None

    def records(self, rows: np.ndarray) -> list[dict]:
        """The rows (batch order indices) as records, for the per-event path; each kind's made at once."""
        wanted = [row for row in rows.tolist() if row not in self._records]
        if wanted:
            wanted_rows = np.array(wanted, dtype=np.int64)
            for kind in np.unique(self.kind[wanted_rows]).tolist():
                of_kind = wanted_rows[self.kind[wanted_rows] == kind]
                made = self.frames[kind].table.take(pa.array(self.row[of_kind])).to_pylist()
                self._records.update(zip(of_kind.tolist(), made))
        return [self._records[row] for row in rows.tolist()]

    def record(self, row: int) -> dict:
        """A row made by `records` before."""
        return self._records[row]


class _BulkSteps:
    """Steps of runs judged in bulk, for their facts: the last step, and the finite losses in the recent ones."""

    def __init__(self, rows: RunRows, members: list[int], quiet: np.ndarray):
        self.rows, self.members, self.quiet = rows, members, quiet  # quiet[i]: member i's steps were in bulk

    def into_facts(self, runs: list[_RunState | None], skip: set[int]) -> None:
        """Bring the facts of these runs forward, but for those in `skip` (they take theirs in batch order)."""
        members = self.members
        kept = self.quiet & np.array([member not in skip for member in members], dtype=bool)
        if not kept.any():
            return
        steps, _ = self.rows.column("step")
        facts = [runs[member].facts for member, keep in zip(members, kept.tolist()) if keep]
        for run_facts, last_step in zip(facts, steps[self.rows.starts[1:] - 1][kept].tolist()):
            run_facts.last_step = last_step
        matrix, valid, counts = self.rows.finite_matrix("loss")
        losses = self.rows.finite("loss")
        extend_all([run_facts.recent_losses for run_facts in facts], matrix[kept], valid[kept], counts[kept],
                   [losses[i] for i in np.flatnonzero(kept).tolist()])


class ColumnarObserver:
    """Judges one batch for an engine; see the module's docstring."""

    def __init__(self, engine: DetectorEngine, frames: Mapping[str, Frame], sources: Sequence[Any] | None):
        self.engine = engine
        self.batch = _Batch(frames)
        self.sources = sources
        self.runs: list[_RunState | None] = [engine._runs.get(run_id) for run_id in self.batch.run_ids]
        self.found: list[tuple[int, list[Alert]]] = []  # (position, its alerts)

    def observe(self) -> list[Alert]:
        batch = self.batch
        slow = np.array([run is None or run.ended or STALLED in run.firing for run in self.runs], dtype=bool)
        ended = batch.of_kind("run_ended")
        if ended is not None:
            slow[batch.run[batch.kind == ended]] = True
        self._observe_in_order(np.flatnonzero(slow[batch.run]))
        fast = np.flatnonzero(~slow)
        if len(fast):
            self._bulk(fast, ~slow[batch.run])
        self.found.sort(key=lambda found: found[0])
        return [alert for _, alerts in self.found for alert in alerts]

    def _source(self, row: int) -> Any:
        return None if self.sources is None else self.sources[self.batch.position[row]]

    def _observe_in_order(self, rows: np.ndarray) -> None:
        """The per-event path for these rows (batch order), the history of runs met for the first time loaded
        at once first."""
        batch, engine = self.batch, self.engine
        records = batch.records(rows)
        kinds = [batch.kinds[kind] for kind in batch.kind[rows].tolist()]
        first: dict[int, tuple[str, dict]] = {}
        for run, kind, record in zip(batch.run[rows].tolist(), kinds, records):
            if self.runs[run] is None and run not in first:
                first[run] = (kind, record)
        engine.prefetch(first.values())
        for row, kind, record in zip(rows.tolist(), kinds, records):
            self._guarded(row, kind, record, engine.observe, kind, record, self._source(row))

    def _guarded(self, row: int, kind: str, record: dict, judge: Callable[..., list[Alert] | None],
                 *args: Any) -> None:
        """One event's detection; a failure is counted and logged and ingest goes on (the event is stored all
        the same), as the per-event pipeline does."""
        try:
            alerts = judge(*args)
        except HistoryUnavailableError:
            raise
        except Exception:
            self.engine.failures += 1
            if self.engine.failures == 1 or self.engine.failures % 1000 == 0:
                log.exception("detectors failed on a %s event of run %s (%d so far)", kind, record.get("run_id"),
                              self.engine.failures)
            return
        if alerts:
            self.found.append((int(self.batch.position[row]), alerts))

    def _bulk(self, fast: np.ndarray, fast_row: np.ndarray) -> None:
        batch = self.batch
        self._liveness(fast, fast_row)
        in_bulk: dict[str, np.ndarray] = {}  # per run: the kind's rows are judged in bulk
        bulk_steps: list[_BulkSteps] = []
        for kind in HOT_KINDS:
            index = batch.of_kind(kind)
            if index is not None:
                in_bulk[kind] = self._judge_kind(kind, index, fast_row, bulk_steps)
        per_event = np.zeros(len(batch.run), dtype=bool)
        for index, kind in enumerate(batch.kinds):
            if kind in in_bulk:
                wanted = ~in_bulk[kind]
            else:
                wanted = np.array([run is not None and kind in run.rules.by_kind for run in self.runs], dtype=bool)
            per_event |= (batch.kind == index) & wanted[batch.run]
        per_event &= fast_row
        mixed = set(np.unique(batch.run[per_event]).tolist())
        for steps in bulk_steps:
            steps.into_facts(self.runs, mixed)
        if mixed:
            batch.records(np.flatnonzero(per_event))  # made at once, per kind
            for run_index in sorted(mixed):
                self._in_order(run_index, per_event, "step" in in_bulk and in_bulk["step"][run_index])

    def _liveness(self, fast: np.ndarray, fast_row: np.ndarray) -> None:
        """What `observe` does for each event before its rules: sources, and for events that tell the run is
        alive (not GPU samples) the latest timestamp, the gaps by which it grew and `spoke`."""
        batch = self.batch
        sources = self._sources_by_run(fast_row)
        if sources is not None:
            for run_index in fast.tolist():
                if sources[run_index]:
                    self.runs[run_index].sources.update(sources[run_index])
        exempt = batch.of_kind(_LIVENESS_EXEMPT)
        live = fast_row if exempt is None else fast_row & (batch.kind != exempt)
        rows = batch.by_run[live[batch.by_run]]
        if not len(rows):
            return
        speaking, counts = np.unique(batch.run[rows], return_counts=True)
        runs = [self.runs[run_index] for run_index in speaking.tolist()]
        width = int(counts.max())
        stamps = np.full((len(speaking), width + 1), _NO_TIME)  # column 0: the latest before the batch
        stamps[:, 0] = [_NO_TIME if run.last_ts is None else run.last_ts for run in runs]
        valid = np.arange(width) < counts[:, None]
        stamps[:, 1:][valid] = batch.ts[rows]
        latest = np.maximum.accumulate(stamps, axis=1)
        before = latest[:, :-1]
        grew = valid & (stamps[:, 1:] > before) & (before != _NO_TIME)
        gaps = (stamps[:, 1:] - before)[grew].tolist()
        ends = np.cumsum(grew.sum(axis=1)).tolist()
        for run, last, start, end in zip(runs, latest[:, -1].tolist(), [0, *ends[:-1]], ends):
            if start != end:
                run.gaps.extend(gaps[start:end])
            run.last_ts, run.spoke = last, True

    def _sources_by_run(self, fast_row: np.ndarray) -> list[list[Any]] | None:
        """Per run: the distinct sources (not None) of its rows; None when the batch has none."""
        if self.sources is None:
            return None
        codes: dict[Any, int] = {}
        stretches = [(codes.setdefault(source, len(codes)), len(list(same)))
                     for source, same in groupby(self.sources)]  # a poll brings each partition's records together
        distinct = list(codes)
        if distinct == [None]:
            return None
        batch = self.batch
        code, length = zip(*stretches)
        of_record = np.repeat(np.array(code, dtype=np.int64), length)
        pairs = np.unique(batch.run[fast_row] * len(distinct) + of_record[batch.position[fast_row]])
        by_run: list[list[Any]] = [[] for _ in batch.run_ids]
        for run_index, code in zip((pairs // len(distinct)).tolist(), (pairs % len(distinct)).tolist()):
            if distinct[code] is not None:
                by_run[run_index].append(distinct[code])
        return by_run

    def _judge_kind(self, kind: str, index: int, fast_row: np.ndarray, bulk_steps: list[_BulkSteps]) -> np.ndarray:
        """Ask each rule set's rules of `kind` for their bulk verdict over the fast runs' rows and bring the
        quiet runs' state forward; per run: whether its rows of the kind were judged in bulk."""
        batch = self.batch
        rows = batch.by_run[(batch.kind[batch.by_run] == index) & fast_row[batch.by_run]]
        counts = np.bincount(batch.run[rows], minlength=len(batch.run_ids))
        in_bulk = np.ones(len(batch.run_ids), dtype=bool)
        groups: dict[int, list[int]] = {}
        for run_index in np.flatnonzero(counts).tolist():
            groups.setdefault(id(self.runs[run_index].rules), []).append(run_index)
        for members in groups.values():
            selected = rows if len(groups) == 1 else rows[np.isin(batch.run[rows], members)]
            starts = np.concatenate([[0], np.cumsum(counts[members])])
            run_rows = RunRows(batch.columns[index], batch.row[selected], starts,
                               [self.runs[member].facts for member in members])
            quiet = self._verdicts(kind, members, run_rows)
            in_bulk[members] = quiet
            if kind == "step":
                bulk_steps.append(_BulkSteps(run_rows, members, quiet))
        return in_bulk

    def _verdicts(self, kind: str, members: list[int], rows: RunRows) -> np.ndarray:
        """Per member run: whether every rule vouched for its rows; the quiet ones' rule state brought forward."""
        runs = [self.runs[member] for member in members]
        rules = runs[0].rules.by_kind.get(kind, ())
        checks = list(zip(*(run.checks[kind] for run in runs))) if rules else []  # per rule, across the runs
        states = [list(map(_STATE, of_rule)) for of_rule in checks]
        try:
            bulks = [rule.bulk(rows, of_rule) for rule, of_rule in zip(rules, states)]
        except Exception:  # a bug in a bulk verdict: the per-event path judges the same rows all the same
            self.engine.fallbacks += 1
            if self.engine.fallbacks == 1 or self.engine.fallbacks % 1000 == 0:
                log.exception("detectors: a bulk verdict on %s rows failed, judged event by event (%d so far)",
                              kind, self.engine.fallbacks)
            return np.zeros(len(members), dtype=bool)
        if any(bulk is None for bulk in bulks):
            return np.zeros(len(members), dtype=bool)
        quiet = np.logical_and.reduce([bulk.quiet for bulk in bulks]) if bulks else np.ones(len(members), bool)
        if kind == "gpu_sample":  # a first step in the batch changes what the samples after it count
            step = self.batch.of_kind("step")
            if step is not None:
                stepped = np.zeros(len(self.batch.run_ids), dtype=bool)
                stepped[self.batch.run[self.batch.kind == step]] = True
                quiet &= ~np.array([run.facts.last_step is None and stepped[m] for run, m in zip(runs, members)])
        firing = np.fromiter(map(bool, map(_FIRING, runs)), bool, len(runs))
        for i in np.flatnonzero(quiet & firing).tolist():
            if any(rule.rule_id in runs[i].firing for rule in rules):
                quiet[i] = False
        chosen = np.flatnonzero(quiet).tolist()
        for bulk, of_rule, rule_checks in zip(bulks, states, checks):
            if bulk.apply is not None:
                self._apply(kind, bulk.apply, of_rule, bulk.updates, chosen)
            for streak in compress(map(_STREAK, rule_checks), quiet & bulk.judged):
                if streak.active:
                    streak.active = 0
        return quiet

    def _apply(self, kind: str, apply: Callable[[Any, Any], None], states: list[Any], updates: Sequence[Any],
               chosen: list[int]) -> None:
        for i in chosen:
            if updates[i] is None:
                continue
            try:
                apply(states[i], updates[i])
            except Exception:
                self.engine.failures += 1
                log.exception("detectors failed bringing the %s state of a run forward (%d so far)", kind,
                              self.engine.failures)

    def _in_order(self, run_index: int, per_event: np.ndarray, steps_in_bulk: bool) -> None:
        """A run with rows judged event by event: those rows in batch order, its steps judged in bulk (if so)
        feeding its facts between them, so that each event judged sees the facts as they were when it came."""
        batch, run = self.batch, self.runs[run_index]
        step = batch.of_kind("step")
        rows = batch.by_run[batch.run_starts[run_index]:batch.run_starts[run_index + 1]]
        if steps_in_bulk:
            steps, losses = batch.columns[step].pylist("step"), batch.columns[step].pylist("loss")
            rows = rows[per_event[rows] | (batch.kind[rows] == step)]
        else:
            rows = rows[per_event[rows]]
        for row, kind, frame_row in zip(rows.tolist(), batch.kind[rows].tolist(), batch.row[rows].tolist()):
            if per_event[row]:
                name, record = batch.kinds[kind], batch.record(row)
                self._guarded(row, name, record, self._detect, run, name, record)
            else:
                run.facts.last_step = steps[frame_row]
                loss = losses[frame_row]
                if loss is not None and math.isfinite(loss):
                    run.facts.recent_losses.add(loss)

    def _detect(self, run: _RunState, kind: str, record: dict) -> list[Alert]:
        alerts: list[Alert] = []
        self.engine._detect(run, kind, record, alerts)
        return alerts
