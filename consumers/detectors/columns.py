"""One kind's rows of several runs as columns, grouped by run: what rules judge in bulk (`Rule.bulk`).

Numbers come as float64 arrays with NaN where the field is null, next to a mask of the rows that carry the field,
since rules tell a missing reading (no finding) from a NaN one (often the very thing they look for).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from .base import RunFacts


class FrameColumns:
    """A frame's table as numpy columns, each converted once however many rule sets read it."""

    def __init__(self, table: pa.Table):
        self.table = table
        self._values: dict[str, np.ndarray] = {}
        self._present: dict[str, np.ndarray] = {}
        self._lists: dict[str, list[Any]] = {}

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


class RunRows:
    """The rows (`rows`, indices into the frame) of `len(facts)` runs, run i's being rows[starts[i]:starts[i + 1]]
    in batch order; `facts[i]` is run i's facts as the batch found them."""

    def __init__(self, columns: FrameColumns, rows: np.ndarray, starts: np.ndarray, facts: list[RunFacts]):
        self._columns = columns
        self.rows = rows
        self.starts = starts
        self.facts = facts
        self.runs = len(facts)
        self._finite: dict[str, list[list[float]]] = {}

    def column(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(values, present) of the field over these rows."""
        return self._columns.values(name)[self.rows], self._columns.present(name)[self.rows]

    def per_run(self, values: np.ndarray) -> np.ndarray:
        """Row values spread over their runs: run i's value repeated for each of its rows."""
        return np.repeat(values, np.diff(self.starts))

    def any(self, mask: np.ndarray) -> np.ndarray:
        """Per run: whether any of its rows is in `mask`."""
        return np.logical_or.reduceat(mask, self.starts[:-1]) if self.runs else np.zeros(0, dtype=bool)

    def count(self, mask: np.ndarray) -> np.ndarray:
        """Per run: how many of its rows are in `mask`."""
        return np.add.reduceat(mask.astype(np.int64), self.starts[:-1]) if self.runs else np.zeros(0, np.int64)

    def split(self, values: list[Any], mask: np.ndarray) -> list[list[Any]]:
        """Per run: `values` (one per row in `mask`, in row order) cut into each run's list."""
        ends = np.cumsum(self.count(mask)).tolist()
        return [values[start:end] for start, end in zip([0, *ends[:-1]], ends)]

    def finite(self, name: str) -> list[list[float]]:
        """Per run: the finite values of the field, in order (what the loss rules read)."""
        if name not in self._finite:
            values, _ = self.column(name)
            finite = np.isfinite(values)
            self._finite[name] = self.split(values[finite].tolist(), finite)
        return self._finite[name]

    def strings(self, name: str, mask: np.ndarray) -> list[list[Any]]:
        """Per run: the field's Python values on the rows in `mask`."""
        every = self._columns.pylist(name)
        return self.split([every[row] for row in self.rows[mask].tolist()], mask)
