"""One kind's rows of several runs as columns, grouped by run: what rules judge in bulk (`Rule.bulk`), and the
helpers that replay their windows' sums over all runs at once.

Numbers come as float64 arrays with NaN where the field is null, next to a mask of the rows that carry the field,
since rules tell a missing reading (no finding) from a NaN one (often the very thing they look for). A window's
sum is kept as `Rolling` keeps it, `total += value - dropped` in order, so a replay adds the same differences in
the same order (np.add.accumulate), never a fresh sum: the state left behind is the per-event one to the bit.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import chain, islice, repeat
from operator import attrgetter
from typing import Any

import numpy as np
import pyarrow as pa

from .base import Rolling, RunFacts


class FrameColumns:
    """A frame's table as numpy columns, each converted once however many rule sets read it."""

    def __init__(self, table: pa.Table):
        self.table = table
        self._values: dict[str, np.ndarray] = {}
        self._present: dict[str, np.ndarray] = {}
        self._lists: dict[str, list[Any]] = {}
        self._codes: dict[str, tuple[np.ndarray, list[Any]]] = {}

    def values(self, name: str) -> np.ndarray:
        if name not in self._values:
            self._values[name] = self.table.column(name).to_numpy()
        return self._values[name]

    def present(self, name: str) -> np.ndarray:
        if name not in self._present:
            column = self.table.column(name)
            self._present[name] = (np.ones(len(column), dtype=bool) if column.null_count == 0
                                   else column.is_valid().to_numpy(zero_copy_only=False))
        return self._present[name]

    def pylist(self, name: str) -> list[Any]:
        if name not in self._lists:
            self._lists[name] = self.table.column(name).to_pylist()
        return self._lists[name]

    def codes(self, name: str) -> tuple[np.ndarray, list[Any]]:
        """(per row: the index of its value in the list, the distinct values)."""
        if name not in self._codes:
            encoded = self.table.column(name).combine_chunks().dictionary_encode()
            self._codes[name] = (encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64),
                                 encoded.dictionary.to_pylist())
        return self._codes[name]


class RunRows:
    """The rows (`rows`, indices into the frame) of `len(facts)` runs, run i's being rows[starts[i]:starts[i + 1]]
    in batch order; `facts[i]` is run i's facts as the batch found them."""

    def __init__(self, columns: FrameColumns, rows: np.ndarray, starts: np.ndarray, facts: list[RunFacts]):
        self._columns = columns
        self.rows = rows
        self.starts = starts
        self.facts = facts
        self.runs = len(facts)
        self.run_of_row = np.repeat(np.arange(self.runs), np.diff(starts))
        self._finite: dict[str, list[list[float]]] = {}
        self._finite_matrix: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def column(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(values, present) of the field over these rows."""
        return self._columns.values(name)[self.rows], self._columns.present(name)[self.rows]

    def per_run(self, values: np.ndarray) -> np.ndarray:
        """Run values spread over their rows: run i's value repeated for each of its rows."""
        return values[self.run_of_row]

    def any(self, mask: np.ndarray) -> np.ndarray:
        """Per run: whether any of its rows is in `mask`."""
        return np.logical_or.reduceat(mask, self.starts[:-1]) if self.runs else np.zeros(0, dtype=bool)

    def count(self, mask: np.ndarray) -> np.ndarray:
        """Per run: how many of its rows are in `mask`."""
        return np.add.reduceat(mask.astype(np.int64), self.starts[:-1]) if self.runs else np.zeros(0, np.int64)

    def split(self, values: list[Any], mask: np.ndarray) -> list[list[Any]]:
        """Per run: `values` (one per row in `mask`, in row order) cut into each run's list."""
        return self._cut(values, self.count(mask))

    def finite(self, name: str) -> list[list[float]]:
        """Per run: the finite values of the field, in order (what the loss rules read)."""
        if name not in self._finite:
            self._finite[name] = self.ragged(*self.finite_matrix(name))
        return self._finite[name]

    def finite_matrix(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(values, valid, counts): run i's finite values of the field, in order, in values[i, :counts[i]] (zeros
        after them; `valid` marks them): the batch's readings of all runs side by side, for replaying sums."""
        if name not in self._finite_matrix:
            values, _ = self.column(name)
            finite = np.isfinite(values)
            counts = self.count(finite)
            width = int(counts.max(initial=0))
            runs = self.run_of_row[finite]
            firsts = np.cumsum(counts) - counts
            matrix = np.zeros((self.runs, width))
            matrix[runs, np.arange(len(runs)) - firsts[runs]] = values[finite]
            self._finite_matrix[name] = matrix, np.arange(width) < counts[:, None], counts
        return self._finite_matrix[name]

    def codes(self, name: str) -> tuple[np.ndarray, list[Any]]:
        """(per row: the index of its value in the list, the distinct values) of a field."""
        codes, values = self._columns.codes(name)
        return codes[self.rows], values

    def ragged(self, matrix: np.ndarray, valid: np.ndarray, counts: np.ndarray) -> list[list[Any]]:
        """Per run: its row of `matrix` where `valid` (its first counts[i] values), as a list."""
        return self._cut(matrix[valid].tolist(), counts)

    @staticmethod
    def _cut(values: list[Any], counts: np.ndarray) -> list[list[Any]]:
        ends = np.cumsum(counts).tolist()
        return [values[start:end] for start, end in zip([0, *ends[:-1]], ends)]


def stacked(windows: Iterable[Iterable[float]], runs: int, width: int) -> np.ndarray:
    """Windows of several runs, `width` numbers for each run, as one row per run (oldest first)."""
    return np.fromiter(chain.from_iterable(windows), np.float64, runs * width).reshape(runs, width)


def dropped(windows: list[Rolling], new: np.ndarray) -> np.ndarray:
    """Per run (row) and new value (column): the value that adding it pushes out of the run's full window."""
    runs, width = new.shape
    head = min(width, windows[0].window) if windows else 0
    old = stacked(map(islice, map(_VALUES, windows), repeat(head)), runs, head)
    return np.concatenate([old, new[:, :width - head]], axis=1) if width > head else old


_VALUES = attrgetter("values")
_TOTAL = attrgetter("total")


def extend_all(windows: list[Rolling], new: np.ndarray, valid: np.ndarray, counts: np.ndarray,
               lists: list[list[float]]) -> None:
    """`windows[i].extend(lists[i])` for every run (lists[i]: its valid row of `new`), full windows' sums replayed
    at once, to the bit."""
    full = np.fromiter((len(window.values) == window.window for window in windows), bool, len(windows))
    replayed = np.flatnonzero(full & (counts > 0))
    for i in np.flatnonzero(~full).tolist():
        windows[i].extend(lists[i])
    if not len(replayed):
        return
    chosen = [windows[i] for i in replayed.tolist()]
    totals = last_valid(running_totals(np.fromiter(map(_TOTAL, chosen), np.float64, len(chosen)),
                                       new[replayed] - dropped(chosen, new[replayed])), counts[replayed])
    for window, i, total in zip(chosen, replayed.tolist(), totals):
        window.values.extend(lists[i])
        window.total = total


def running_totals(start: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    """Per row: start + deltas[0], then + deltas[1], …: the sums `total += delta` leaves after each, to the bit
    (accumulate adds strictly in order, unlike sum's pairwise adding)."""
    return np.add.accumulate(np.concatenate([start[:, None], deltas], axis=1), axis=1)[:, 1:]


def last_valid(matrix: np.ndarray, counts: np.ndarray) -> list[Any]:
    """Per row: its value at column counts[i] - 1 (every count at least 1)."""
    return matrix[np.arange(len(counts)), counts - 1].tolist()
