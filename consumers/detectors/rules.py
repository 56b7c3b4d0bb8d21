"""Rules over train steps: the loss, its trend and stability, grad norm, throughput."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import QUIET, Bulk, Finding, Rolling, Rule, RunFacts
from .columns import RunRows, dropped, last_valid, running_totals, stacked

STEP = frozenset({"step"})


@dataclass
class LossNotFinite(Rule):
    field: ClassVar[str] = "loss"
    rule_id: ClassVar[str] = "loss_not_finite"
    severity: ClassVar[str] = "block"
    kinds: ClassVar[frozenset[str]] = STEP

    def check(self, record: dict, state: None, run: RunFacts) -> Finding | None:
        loss = record.get("loss")
        if loss is None:
            return None
        if math.isfinite(loss):
            return QUIET
        return Finding(True, loss, None, f"train loss is {loss} at step {record['step']}")

    def bulk(self, rows: RunRows, states: list[None]) -> Bulk:
        losses, present = rows.column("loss")
        return Bulk(~rows.any(present & ~np.isfinite(losses)), rows.any(present))


@dataclass
class LossSpike(Rule):
    """Loss above `factor` × the median of the last `window` finite losses (after `min_history` of them), and
    above it by at least `min_increase`."""

    factor: float
    min_increase: float
    window: int
    min_history: int
    field: ClassVar[str] = "loss"
    rule_id: ClassVar[str] = "loss_spike"
    severity: ClassVar[str] = "critical"
    kinds: ClassVar[frozenset[str]] = STEP

    def new_state(self) -> deque:
        return deque(maxlen=self.window)

    def check(self, record: dict, history: deque, run: RunFacts) -> Finding | None:
        loss = record.get("loss")
        if loss is None or not math.isfinite(loss):
            return None
        finding = None
        if len(history) >= self.min_history:
            ordered = sorted(history)
            middle = len(ordered) // 2
            baseline = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
            threshold = max(self.factor * baseline, baseline + self.min_increase)
            if baseline > 0 and loss > threshold:
                finding = Finding(True, loss, threshold,
                                  f"loss {loss:.4g} > {self.factor} × recent median {baseline:.4g}")
            else:
                finding = QUIET
        if finding is None or not finding.active:
            history.append(loss)  # a spike does not become part of its own baseline
        return finding

    def bulk(self, rows: RunRows, states: list[deque]) -> Bulk:
        """Quiet where no new loss exceeds the threshold of the lowest baseline any of its windows can have.

        Each reading's window is a sub-multiset of the history plus the batch's losses before the last, so its
        median is at least that pool's k-th smallest value (k: the lower middle of the smallest window judged);
        thresholds grow with the baseline, so a loss under the threshold of that floor is under its own."""
        new, valid, counts = rows.finite_matrix("loss")
        quiet, judged = np.ones(rows.runs, dtype=bool), np.zeros(rows.runs, dtype=bool)
        sizes = np.array([len(history) for history in states], dtype=np.int64)
        first = np.maximum(0, self.min_history - sizes)  # the first reading with enough history
        judging = np.flatnonzero(counts > first) if self.window >= self.min_history else np.zeros(0, np.int64)
        if len(judging):
            judged[judging] = True
            quiet[judging] = self._under_floor([states[i] for i in judging.tolist()], new[judging],
                                               valid[judging], counts[judging], sizes[judging], first[judging])
        return Bulk(quiet, judged, rows.finite("loss"), deque.extend)

    def _under_floor(self, histories: list[deque], new: np.ndarray, valid: np.ndarray, counts: np.ndarray,
                     sizes: np.ndarray, first: np.ndarray) -> np.ndarray:
        runs, width = new.shape
        pool = np.full((runs, self.window + width), np.inf)  # inf: not in the pool
        if (sizes == self.window).all():
            pool[:, :self.window] = stacked(histories, runs, self.window)
        else:
            pool[:, :self.window] = [[math.inf] * (self.window - len(history)) + list(history)
                                     for history in histories]
        pool[:, self.window:] = np.where(valid, new, np.inf)
        pool[np.arange(runs), self.window + counts - 1] = np.inf  # the last loss is in no window judged
        pool.sort(axis=1)
        smallest = np.minimum(self.window, sizes + first)
        floor = pool[np.arange(runs), (smallest - 1) // 2]
        judged_losses = np.where(valid & (np.arange(width) >= first[:, None]), new, -np.inf)
        return (floor > 0) & (judged_losses.max(axis=1) <= np.maximum(self.factor * floor,
                                                                        floor + self.min_increase))


@dataclass
class GradNormHigh(Rule):
    max_grad_norm: float
    field: ClassVar[str] = "grad_norm"
    rule_id: ClassVar[str] = "grad_norm_high"
    severity: ClassVar[str] = "warning"
    kinds: ClassVar[frozenset[str]] = STEP

    def check(self, record: dict, state: None, run: RunFacts) -> Finding | None:
        grad_norm = record.get("grad_norm")
        if grad_norm is None:
            return None
        if math.isfinite(grad_norm) and grad_norm <= self.max_grad_norm:
            return QUIET
        return Finding(True, grad_norm, self.max_grad_norm, f"grad norm {grad_norm:.4g} > {self.max_grad_norm:g}")

    def bulk(self, rows: RunRows, states: list[None]) -> Bulk:
        norms, present = rows.column("grad_norm")
        with np.errstate(invalid="ignore"):
            high = present & ~(np.isfinite(norms) & (norms <= self.max_grad_norm))
        return Bulk(~rows.any(high), rows.any(present))


@dataclass
class ThroughputLow(Rule):
    """Most (more than half) of the last `window` throughput readings below `min_tokens_per_s`."""

    min_tokens_per_s: float
    window: int
    field: ClassVar[str] = "tokens_per_s"
    rule_id: ClassVar[str] = "throughput_low"
    severity: ClassVar[str] = "warning"
    kinds: ClassVar[frozenset[str]] = STEP

    def new_state(self) -> Rolling:
        return Rolling(self.window)

    def check(self, record: dict, lows: Rolling, run: RunFacts) -> Finding | None:
        tokens_per_s = record.get("tokens_per_s")
        if tokens_per_s is None or not math.isfinite(tokens_per_s):
            return None
        lows.add(tokens_per_s < self.min_tokens_per_s)
        if not lows.mostly():
            return QUIET
        return Finding(True, tokens_per_s, self.min_tokens_per_s,
                       f"throughput {tokens_per_s:.4g} tokens/s; {lows.total:.0f} of the last {self.window} steps "
                       f"below {self.min_tokens_per_s:g}")

    def bulk(self, rows: RunRows, states: list[Rolling]) -> Bulk:
        """Quiet where the window's low readings plus the batch's cannot make most of a window."""
        rates, _ = rows.column("tokens_per_s")
        read = np.isfinite(rates)
        low = read & (rates < self.min_tokens_per_s)
        lows_before = np.array([state.total for state in states])
        new_lows = rows.count(low)
        quiet = 2 * (lows_before + new_lows) <= self.window
        # a full window of clear readings is the same after more clear ones
        settled = (lows_before + new_lows == 0) & np.array([state.full for state in states], dtype=bool)
        updates = [None if same else lows for same, lows in zip(settled.tolist(), rows.split(low[read].tolist(), read))]
        return Bulk(quiet, rows.any(read), updates, Rolling.extend)


def _replayed(rows: RunRows, states: list, warm: np.ndarray, replay, extend) -> Bulk:
    """The bulk verdict of a rule over a window of finite losses: runs with no new loss are quiet, warm runs (their
    windows full) are replayed by `replay`, the others are judged event by event."""
    new, valid, counts = rows.finite_matrix("loss")
    quiet, judged = (counts == 0) | warm, np.zeros(rows.runs, dtype=bool)
    updates: list[tuple | None] = [None] * rows.runs
    replayed = np.flatnonzero(warm & (counts > 0))
    if len(replayed):
        runs = replayed.tolist()
        losses = rows.finite("loss")
        quiet[replayed], judged[replayed], outcomes = replay(
            [states[i] for i in runs], new[replayed], valid[replayed], counts[replayed], [losses[i] for i in runs], rows)
        for i, outcome in zip(runs, outcomes):
            updates[i] = outcome
    return Bulk(quiet, judged, updates, extend)


@dataclass
class _Halves:
    older: Rolling
    newer: Rolling
    initial: Rolling  # the run's first half-window of losses: its starting level
    initial_total: float | None = None

    def extend(self, update: tuple) -> None:
        """Take a bulk replay's outcome (Underfitting.bulk): the new losses, those they moved to the older half,
        and the halves' sums."""
        new, moved, self.newer.total, self.older.total = update
        self.newer.values.extend(new)
        self.older.values.extend(moved)


@dataclass
class Underfitting(Rule):
    """The loss stopped decreasing before the run got anywhere.

    Over the last `window` finite losses, the newer half's mean is not at least `min_decrease` (relative) below
    the older half's, and it is still above (1 − `min_progress`) × the run's starting level (the mean of its
    first `window`/2 losses). The second condition keeps a converged run on its plateau quiet: a flat curve is
    underfitting only while the loss is near where it started (or back there).
    """

    window: int
    min_decrease: float
    min_progress: float
    field: ClassVar[str] = "loss"
    rule_id: ClassVar[str] = "underfitting"
    severity: ClassVar[str] = "warning"
    kinds: ClassVar[frozenset[str]] = STEP

    def new_state(self) -> _Halves:
        half = self.window // 2
        return _Halves(Rolling(half), Rolling(half), Rolling(half))

    def check(self, record: dict, state: _Halves, run: RunFacts) -> Finding | None:
        loss = record.get("loss")
        if loss is None or not math.isfinite(loss):
            return None
        if state.initial_total is None:
            state.initial.add(loss)
            if state.initial.full:
                state.initial_total = state.initial.total
        moved = state.newer.add(loss)
        if moved is not None:
            state.older.add(moved)
        if not state.older.full:
            return None
        half = state.older.window
        older, newer, start = state.older.total / half, state.newer.total / half, state.initial_total / half
        if start <= 0 or older <= 0:
            return None  # ratios of non-positive losses say nothing
        not_decreasing = newer >= (1 - self.min_decrease) * older
        near_start = newer >= (1 - self.min_progress) * start
        if not (not_decreasing and near_start):
            return QUIET
        return Finding(True, newer, (1 - self.min_decrease) * older,
                       f"loss not decreasing: mean {newer:.4g} over the last {half} steps vs {older:.4g} before, "
                       f"{newer / start:.0%} of its starting level {start:.4g}")

    def bulk(self, rows: RunRows, states: list[_Halves]) -> Bulk:
        """Replays the halves' sums as `check` would (same operations, same order) on runs past their first
        window; runs still filling it are judged event by event."""
        warm = np.array([state.initial_total is not None and state.older.full for state in states], dtype=bool)
        return _replayed(rows, states, warm, self._replay, _Halves.extend)

    def _replay(self, states: list[_Halves], new: np.ndarray, valid: np.ndarray, counts: np.ndarray,
                losses: list[list[float]], rows: RunRows) -> tuple[np.ndarray, np.ndarray, list[tuple]]:
        half = self.window // 2
        moved = dropped([state.newer for state in states], new)  # to the older half
        newer_totals = running_totals(np.array([state.newer.total for state in states]), new - moved)
        older_totals = running_totals(np.array([state.older.total for state in states]),
                                      moved - dropped([state.older for state in states], moved))
        older, newer = older_totals / half, newer_totals / half
        start = np.array([state.initial_total for state in states])[:, None] / half
        read = valid & ~((start <= 0) | (older <= 0))
        active = read & (newer >= (1 - self.min_decrease) * older) & (newer >= (1 - self.min_progress) * start)
        outcomes = list(zip(losses, rows.ragged(moved, valid, counts),
                            last_valid(newer_totals, counts), last_valid(older_totals, counts)))
        return ~active.any(axis=1), read.any(axis=1), outcomes


@dataclass
class _Swings:
    losses: Rolling
    changes: Rolling  # |loss − previous loss|
    flips: Rolling  # 1 where a change reverses the direction of the previous one
    last_change: float = 0.0

    def extend(self, update: tuple) -> None:
        """Take a bulk replay's outcome (LossUnstable.bulk): the new values of each window, their sums and the
        last change."""
        losses, changes, flips, self.losses.total, self.changes.total, self.flips.total, self.last_change = update
        self.losses.values.extend(losses)
        self.changes.values.extend(changes)
        self.flips.values.extend(flips)


@dataclass
class LossUnstable(Rule):
    """The loss oscillates: it keeps reversing direction, by large steps.

    Over the last `window` finite losses: at least `min_flip_fraction` of consecutive changes reverse the
    previous change's direction, and the mean absolute change is at least `min_relative_swing` × the mean loss
    and at least `min_swing`.
    Noise on a healthy curve flips direction often (about 2/3 of the time) but by a few percent; a steep
    healthy descent moves by large steps but in one direction. Only both together are instability.
    """

    window: int
    min_flip_fraction: float
    min_relative_swing: float
    min_swing: float
    field: ClassVar[str] = "loss"
    rule_id: ClassVar[str] = "loss_unstable"
    severity: ClassVar[str] = "warning"
    kinds: ClassVar[frozenset[str]] = STEP

    def new_state(self) -> _Swings:
        return _Swings(Rolling(self.window), Rolling(self.window - 1), Rolling(self.window - 2))

    def check(self, record: dict, state: _Swings, run: RunFacts) -> Finding | None:
        loss = record.get("loss")
        if loss is None or not math.isfinite(loss):
            return None
        if state.losses.values:
            change = loss - state.losses.values[-1]
            if state.changes.values:
                state.flips.add(1.0 if change * state.last_change < 0 else 0.0)
            state.changes.add(abs(change))
            state.last_change = change
        state.losses.add(loss)
        if not state.flips.full:
            return None
        mean_loss = state.losses.total / self.window
        if mean_loss <= 0:
            return None
        flip_fraction = state.flips.total / state.flips.window
        mean_change = state.changes.total / state.changes.window
        swing = mean_change / mean_loss
        if (flip_fraction >= self.min_flip_fraction and swing >= self.min_relative_swing
                and mean_change >= self.min_swing):
            return Finding(True, swing, self.min_relative_swing,
                           f"loss oscillates: {flip_fraction:.0%} of the last {self.window} steps reverse direction, "
                           f"by {swing:.0%} of the mean loss {mean_loss:.4g} on average")
        return QUIET

    def bulk(self, rows: RunRows, states: list[_Swings]) -> Bulk:
        """Replays the windows' sums as `check` would (same operations, same order) on runs whose windows are
        full; runs still filling them are judged event by event."""
        warm = np.array([state.flips.full for state in states], dtype=bool)
        return _replayed(rows, states, warm, self._replay, _Swings.extend)

    def _replay(self, states: list[_Swings], new: np.ndarray, valid: np.ndarray, counts: np.ndarray,
                losses: list[list[float]], rows: RunRows) -> tuple[np.ndarray, np.ndarray, list[tuple]]:
        window = self.window
        previous = np.concatenate([np.array([s.losses.values[-1] for s in states])[:, None], new[:, :-1]], axis=1)
        change = new - previous
        change_before = np.concatenate([np.array([s.last_change for s in states])[:, None], change[:, :-1]], axis=1)
        flip = np.where(change * change_before < 0, 1.0, 0.0)
        losses_totals = running_totals(np.array([s.losses.total for s in states]),
                                       new - dropped([s.losses for s in states], new))
        changes_totals = running_totals(np.array([s.changes.total for s in states]),
                                        np.abs(change) - dropped([s.changes for s in states], np.abs(change)))
        flips_totals = running_totals(np.array([s.flips.total for s in states]),
                                      flip - dropped([s.flips for s in states], flip))
        mean_loss = losses_totals / window
        with np.errstate(divide="ignore", invalid="ignore"):
            read = valid & ~(mean_loss <= 0)
            mean_change = changes_totals / (window - 1)
            swing = mean_change / mean_loss
            active = read & (flips_totals / (window - 2) >= self.min_flip_fraction) & (
                swing >= self.min_relative_swing) & (mean_change >= self.min_swing)
        outcomes = list(zip(losses, rows.ragged(np.abs(change), valid, counts),
                            rows.ragged(flip, valid, counts), last_valid(losses_totals, counts),
                            last_valid(changes_totals, counts), last_valid(flips_totals, counts),
                            last_valid(change, counts)))
        return ~active.any(axis=1), read.any(axis=1), outcomes
