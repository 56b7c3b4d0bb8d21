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
"""

from __future__ import annotations

from clickhouse_connect.driver.client import Client

from .rows import TABLE_FOR_KIND, columns_of

# The columns that identify the sequence an event belongs to; the raw tables' sorting keys say the same.
_SEQUENCE = {"gpu_sample": ("run_id", "host", "rank")}
_DEFAULT_SEQUENCE = ("run_id",)
MAX_MARKS = 200_000  # sequences remembered; beyond that they are forgotten and learnt again


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
        columns = columns_of(kind)
        key_at = [columns.index(name) for name in _SEQUENCE.get(kind, _DEFAULT_SEQUENCE)]
        seq_at = columns.index("seq")
        table = TABLE_FOR_KIND[kind]
        keys = [(table, *(row[i] for i in key_at)) for row in rows]
        unknown = {key for key in keys if key not in self._marks}
        if unknown:
            self._learn(kind, table, unknown)
        marks = self._marks
        pending: dict[tuple, int] = {}
        fresh, suspects = [], []
        for i, (key, row) in enumerate(zip(keys, rows)):
            seq = row[seq_at]
            if seq > pending.get(key, marks[key]):
                fresh.append(i)
                pending[key] = seq
            else:  # at or below what is stored, or repeated (or out of order) within this batch
                suspects.append(i)
        if suspects:
            stored_below_mark = [i for i in suspects if rows[i][seq_at] <= marks[keys[i]]]
            fresh = self._not_stored(kind, table, rows, fresh, suspects, stored_below_mark)
        return fresh

    def stored(self, kind: str, rows: list[list]) -> None:
        """Raise the marks past rows just inserted."""
        if kind not in _TRACKED or not rows:
            return
        columns = columns_of(kind)
        key_at = [columns.index(name) for name in _SEQUENCE.get(kind, _DEFAULT_SEQUENCE)]
        seq_at = columns.index("seq")
        table = TABLE_FOR_KIND[kind]
        if len(self._marks) + len(rows) > MAX_MARKS:
            self._marks.clear()
        marks = self._marks
        for row in rows:
            key = (table, *(row[i] for i in key_at))
            if row[seq_at] > marks.get(key, -1):
                marks[key] = row[seq_at]

    def _not_stored(self, kind: str, table: str, rows: list[list], fresh: list[int], suspects: list[int],
                    lookup: list[int]) -> list[int]:
        """`fresh` plus the suspects whose event is neither stored (looked up for the rows in `lookup`) nor
        already among this batch's fresh rows."""
        id_at = columns_of(kind).index("event_id")
        run_at = columns_of(kind).index("run_id")
        taken = {rows[i][id_at] for i in fresh}
        if lookup:
            result = self._client.query(
                f"SELECT DISTINCT event_id FROM {table} WHERE run_id IN {{run_ids:Array(String)}} "
                f"AND event_id IN {{ids:Array(String)}}",
                parameters={"run_ids": sorted({rows[i][run_at] for i in lookup}),
                            "ids": sorted({rows[i][id_at] for i in lookup})},
            )
            taken.update(row[0] for row in result.result_rows)
        for i in suspects:
            if rows[i][id_at] not in taken:
                taken.add(rows[i][id_at])
                fresh.append(i)
        return sorted(fresh)

    def _learn(self, kind: str, table: str, keys: set[tuple]) -> None:
        names = _SEQUENCE.get(kind, _DEFAULT_SEQUENCE)
        run_ids = sorted({key[1] for key in keys})
        result = self._client.query(
            f"SELECT {', '.join(names)}, max(seq) FROM {table} WHERE run_id IN {{run_ids:Array(String)}} "
            f"GROUP BY {', '.join(names)}",
            parameters={"run_ids": run_ids},
        )
        for row in result.result_rows:
            self._marks[(table, *row[:-1])] = row[-1]
        for key in keys:  # sequences with nothing stored start below the first seq, 0
            self._marks.setdefault(key, -1)


# Alerts are made by consumers, identified by their incident, and re-made on replay on purpose; not tracked.
_TRACKED = frozenset(TABLE_FOR_KIND) - {"alert"}
