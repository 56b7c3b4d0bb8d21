"""Which events are already stored, so that an insert never repeats one (and rollups never count one twice).

An event is left out as a redelivery only when that very event (its `event_id`) is stored. Checking every id
against the store would cost a query per batch, so a cheap test comes first: per table and run (and per GPU for
samples) the highest stored `seq` is a high-water mark, and an event above it cannot be stored yet. Only events
at or below the mark are looked up by id: redeliveries after a crash, and the events of an earlier process of the
same run that arrive late (a preempted job's spool replayed after its successor's events were stored: the
successor numbers from its own, later start, so the predecessor's events sit below the mark but were never stored).

Marks are learnt from the store the first time a run is seen in a batch (one query per table per batch), then
kept in memory. A mark can only be trusted while this process is the partition's sole writer, so the owner
forgets them all when partitions are revoked or an insert fails part-way.

Rows (the per-record path) and frames (the columnar path) are both reduced to one shape, `_Sequences`, and judged by
one set of rules: on columns, so that a batch of events above their marks and in order costs a few numpy passes;
only the sequences that break that order are walked event by event.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from clickhouse_connect.driver.client import Client

from .rows import TABLE_FOR_KIND, columns_of

# The fields that identify the sequence an event belongs to; the raw tables' sorting keys say the same.
_SEQUENCE = {"gpu_sample": ("run_id", "host", "rank")}
_DEFAULT_SEQUENCE = ("run_id",)
MAX_MARKS = 200_000  # sequences remembered; beyond that they are forgotten and learnt again


@dataclass
class _Sequences:
    """A batch's events of one kind as the de-duplication rules see them."""

    kind: str
    keys: list[tuple]  # the distinct sequences: (table, run_id[, host, rank]); key[1] is always the run
    codes: np.ndarray  # per event, the index of its sequence in `keys`
    seqs: np.ndarray  # int64, per event
    event_ids: Callable[[np.ndarray], list[str]]  # the ids of the events at these indices


class StoredEvents:
    def __init__(self, client: Client):
        self._client = client
        self._marks: dict[tuple, int] = {}

    def forget(self) -> None:
        self._marks.clear()

    def fresh(self, kind: str, rows: list[list]) -> list[int]:
        """Indices of the rows not stored yet (the first of any repeated in `rows`), in order."""
        if kind not in _TRACKED:
            return list(range(len(rows)))
        return np.flatnonzero(self._fresh_mask(_of_rows(kind, rows))).tolist()

    def fresh_mask(self, kind: str, table: pa.Table) -> np.ndarray:
        """Per row of a frame's `table` (reader-shaped, as `Frame.table`): True when its event is not stored yet
        (the first of any repeated in the table); the same rules as `fresh`."""
        if kind not in _TRACKED:
            return np.ones(table.num_rows, dtype=bool)
        return self._fresh_mask(_of_table(kind, table))

    def stored(self, kind: str, rows: list[list]) -> None:
        """Raise the marks past rows just inserted."""
        if kind in _TRACKED and rows:
            self._raise_marks(_of_rows(kind, rows))

    def stored_rows(self, kind: str, table: pa.Table, indices: np.ndarray) -> None:
        """Raise the marks past the rows at `indices` of a frame's table, just inserted."""
        if kind in _TRACKED and len(indices):
            events = _of_table(kind, table)  # cheaper than taking the rows first: the columns are only encoded
            events.codes, events.seqs = events.codes[indices], events.seqs[indices]
            self._raise_marks(events)

    def _fresh_mask(self, events: _Sequences) -> np.ndarray:
        if not len(events.seqs):
            return np.zeros(0, dtype=bool)
        unknown = [key for key in events.keys if key not in self._marks]
        if unknown:
            self._learn(events.kind, unknown)
        marks = np.array([self._marks[key] for key in events.keys], dtype=np.int64)
        fresh = _above_marks_in_order(events.codes, events.seqs, marks)
        if not fresh.all():
            suspects = np.flatnonzero(~fresh)
            stored_below_mark = suspects[events.seqs[suspects] <= marks[events.codes[suspects]]]
            self._add_not_stored(events, fresh, suspects, stored_below_mark)
        return fresh

    def _raise_marks(self, events: _Sequences) -> None:
        highest = np.full(len(events.keys), np.iinfo(np.int64).min, dtype=np.int64)
        np.maximum.at(highest, events.codes, events.seqs)
        if len(self._marks) + len(events.keys) > MAX_MARKS:
            self._marks.clear()
        marks = self._marks
        for key, seq in zip(events.keys, highest.tolist()):
            if seq > marks.get(key, -1):
                marks[key] = seq

    def _add_not_stored(self, events: _Sequences, fresh: np.ndarray, suspects: np.ndarray,
                        lookup: np.ndarray) -> None:
        """Mark fresh, in `fresh`, the suspects whose event is neither stored (looked up for the rows in `lookup`)
        nor already among this batch's fresh rows; the first of repeated ids wins."""
        taken = set(events.event_ids(np.flatnonzero(fresh)))
        if len(lookup):
            result = self._client.query(
                f"SELECT DISTINCT event_id FROM {TABLE_FOR_KIND[events.kind]} "
                f"WHERE run_id IN {{run_ids:Array(String)}} AND event_id IN {{ids:Array(String)}}",
                parameters={"run_ids": sorted({events.keys[code][1] for code in events.codes[lookup].tolist()}),
                            "ids": sorted(set(events.event_ids(lookup)))},
            )
            taken.update(row[0] for row in result.result_rows)
        for i, event_id in zip(suspects.tolist(), events.event_ids(suspects)):
            if event_id not in taken:
                taken.add(event_id)
                fresh[i] = True

    def _learn(self, kind: str, keys: list[tuple]) -> None:
        table = TABLE_FOR_KIND[kind]
        names = _SEQUENCE.get(kind, _DEFAULT_SEQUENCE)
        result = self._client.query(
            f"SELECT {', '.join(names)}, max(seq) FROM {table} WHERE run_id IN {{run_ids:Array(String)}} "
            f"GROUP BY {', '.join(names)}",
            parameters={"run_ids": sorted({key[1] for key in keys})},
        )
        for row in result.result_rows:
            self._marks[(table, *row[:-1])] = row[-1]
        for key in keys:  # sequences with nothing stored start below the first seq, 0
            self._marks.setdefault(key, -1)


def _above_marks_in_order(codes: np.ndarray, seqs: np.ndarray, marks: np.ndarray) -> np.ndarray:
    """Per event: True when its seq is above its sequence's mark and above every earlier seq of its sequence in
    the batch (such an event cannot be stored yet, nor repeat one of the batch)."""
    order = np.argsort(codes, kind="stable")  # each sequence's events together, in batch order
    in_order_codes, in_order_seqs = codes[order], seqs[order]
    previous = marks[in_order_codes]
    same_sequence = in_order_codes[1:] == in_order_codes[:-1]
    previous[1:][same_sequence] = in_order_seqs[:-1][same_sequence]
    fresh = np.empty(len(codes), dtype=bool)
    fresh[order] = in_order_seqs > previous
    if fresh.all():  # the common case: every sequence rises from its mark
        return fresh
    # A sequence that falls back somewhere: above what earlier? The highest seq before, not the previous one.
    broken = np.isin(codes, np.unique(codes[~fresh]))
    highest = dict(enumerate(marks.tolist()))
    for i, code, seq in zip(np.flatnonzero(broken).tolist(), codes[broken].tolist(), seqs[broken].tolist()):
        fresh[i] = seq > highest[code]
        if fresh[i]:
            highest[code] = seq
    return fresh


def _of_rows(kind: str, rows: Sequence[list]) -> _Sequences:
    columns = columns_of(kind)
    key_at = [columns.index(name) for name in _SEQUENCE.get(kind, _DEFAULT_SEQUENCE)]
    seq_at, id_at = columns.index("seq"), columns.index("event_id")
    table = TABLE_FOR_KIND[kind]
    index: dict[tuple, int] = {}
    codes = [index.setdefault((table, *(row[i] for i in key_at)), len(index)) for row in rows]
    return _Sequences(kind, list(index), np.array(codes, dtype=np.int64),
                      np.array([row[seq_at] for row in rows], dtype=np.int64),
                      lambda indices: [rows[i][id_at] for i in indices.tolist()])


def _of_table(kind: str, table: pa.Table) -> _Sequences:
    """The sequences of a reader-shaped table: each key field dictionary-encoded, the codes combined."""
    codes = np.zeros(table.num_rows, dtype=np.int64)
    values: list[list] = []
    for name in _SEQUENCE.get(kind, _DEFAULT_SEQUENCE):
        encoded = pc.dictionary_encode(table.column(name).combine_chunks())
        codes = codes * len(encoded.dictionary) + encoded.indices.to_numpy(zero_copy_only=False)
        values.append(encoded.dictionary.to_pylist())
    distinct, codes = np.unique(codes, return_inverse=True)
    keys = []
    for combined in distinct.tolist():
        parts = []
        for dictionary in reversed(values):
            combined, at = divmod(combined, len(dictionary))
            parts.append(dictionary[at])
        keys.append((TABLE_FOR_KIND[kind], *reversed(parts)))
    event_ids = table.column("event_id")
    return _Sequences(kind, keys, codes.astype(np.int64), table.column("seq").to_numpy(),
                      lambda indices: event_ids.take(pa.array(indices)).to_pylist())


# Alerts are made by consumers, identified by their incident, and re-made on replay on purpose; not tracked.
_TRACKED = frozenset(TABLE_FOR_KIND) - {"alert"}
