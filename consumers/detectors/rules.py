"""Rules over train steps: the loss, its trend and stability, grad norm, throughput."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import QUIET, Bulk, Finding, Rolling, Rule, RunFacts
from .columns import RunRows

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

        Each reading's window is a sub-multiset of the history plus the batch's losses, so its median is at least
        that pool's k-th smallest value (k: the lower middle of the smallest window judged); thresholds grow with
        the baseline, so a loss under the threshold of that floor is under its own."""
        new_losses = rows.finite("loss")
        quiet, judged = np.ones(rows.runs, dtype=bool), np.zeros(rows.runs, dtype=bool)
        for i, (history, new) in enumerate(zip(states, new_losses)):
            first = max(0, self.min_history - len(history))  # the first reading with enough history
            if not new or self.window < self.min_history or first >= len(new):
                continue
            judged[i] = True
            smallest = min(self.window, len(history) + first)
            floor = sorted([*history, *new[:-1]])[(smallest - 1) // 2]
            if floor <= 0 or max(new[first:]) > max(self.factor * floor, floor + self.min_increase):
                quiet[i] = False
        return Bulk(quiet, judged, new_losses, deque.extend)


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
        quiet = 2 * (lows_before + rows.count(low)) <= self.window
        return Bulk(quiet, rows.any(read), rows.split(low[read].tolist(), read), Rolling.extend)


@dataclass
class _Halves:
    older: Rolling
    newer: Rolling
    initial: Rolling  # the run's first half-window of losses: its starting level
    initial_total: float | None = None

    def extend(self, update: tuple | None) -> None:
        """Take a bulk replay's outcome (Underfitting.bulk): the new losses, those they moved to the older half,
        and the halves' sums."""
        if update is None:
            return
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
        quiet, judged = np.ones(rows.runs, dtype=bool), np.zeros(rows.runs, dtype=bool)
        updates: list[tuple | None] = []
        for i, (state, new) in enumerate(zip(states, rows.finite("loss"))):
            update = None
            if not new:
                pass
            elif state.initial_total is None or not state.older.full:
                quiet[i] = False
            else:
                update, judged[i], quiet[i] = self._replay(state, new)
            updates.append(update)
        return Bulk(quiet, judged, updates, _Halves.extend)

    def _replay(self, state: _Halves, new: list[float]) -> tuple[tuple, bool, bool]:
        half = state.older.window
        sequence = [*state.older.values, *state.newer.values, *new]
        older_total, newer_total, start = state.older.total, state.newer.total, state.initial_total / half
        judged = False
        for j, loss in enumerate(new):
            moved = sequence[half + j]  # leaves the newer half for the older one
            newer_total += loss - moved
            older_total += moved - sequence[j]
            older, newer = older_total / half, newer_total / half
            if start <= 0 or older <= 0:
                continue
            judged = True
            if newer >= (1 - self.min_decrease) * older and newer >= (1 - self.min_progress) * start:
                return (), judged, False
        return (new, sequence[half:half + len(new)], newer_total, older_total), judged, True


@dataclass
class _Swings:
    losses: Rolling
    changes: Rolling  # |loss − previous loss|
    flips: Rolling  # 1 where a change reverses the direction of the previous one
    last_change: float = 0.0

    def extend(self, update: tuple | None) -> None:
        """Take a bulk replay's outcome (LossUnstable.bulk): the new values of each window, their sums and the
        last change."""
        if update is None:
            return
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
        quiet, judged = np.ones(rows.runs, dtype=bool), np.zeros(rows.runs, dtype=bool)
        updates: list[tuple | None] = []
        for i, (state, new) in enumerate(zip(states, rows.finite("loss"))):
            update = None
            if not new:
                pass
            elif not state.flips.full:
                quiet[i] = False
            else:
                update, judged[i], quiet[i] = self._replay(state, new)
            updates.append(update)
        return Bulk(quiet, judged, updates, _Swings.extend)

    def _replay(self, state: _Swings, new: list[float]) -> tuple[tuple, bool, bool]:
        losses_window, changes_window, flips_window = state.losses, state.changes, state.flips
        loss_values = [*losses_window.values, *new]
        change_values, flip_values = [*changes_window.values], [*flips_window.values]
        losses_total, changes_total, flips_total = losses_window.total, changes_window.total, flips_window.total
        last_change, previous = state.last_change, loss_values[self.window - 1]
        judged = False
        for j, loss in enumerate(new):
            change = loss - previous
            flip = 1.0 if change * last_change < 0 else 0.0
            flip_values.append(flip)
            flips_total += flip - flip_values[j]
            change_values.append(abs(change))
            changes_total += change_values[-1] - change_values[j]
            last_change, previous = change, loss
            losses_total += loss - loss_values[j]
            mean_loss = losses_total / self.window
            if mean_loss <= 0:
                continue
            judged = True
            flip_fraction = flips_total / flips_window.window
            mean_change = changes_total / changes_window.window
            swing = mean_change / mean_loss
            if (flip_fraction >= self.min_flip_fraction and swing >= self.min_relative_swing
                    and mean_change >= self.min_swing):
                return (), judged, False
        count = len(new)
        return (new, change_values[-count:], flip_values[-count:], losses_total, changes_total, flips_total,
                last_change), judged, True
