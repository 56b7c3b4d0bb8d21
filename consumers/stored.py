"""Which events are already stored, so that an insert never repeats one (and rollups never count one twice).

A producer numbers its run's events (`seq`) and they reach a table in that order: a run's events share one
partition, the spool and the idempotent producer keep order. So per table and run (and per GPU for samples) the
highest stored `seq` is a high-water mark: an event at or below it is a redelivery. Marks are learnt from the
store the first time a run is seen in a batch (one query per table per batch), then kept in memory. A mark can
only be trusted while this process is the partition's sole writer, so the owner forgets them all when partitions
are revoked or an insert fails part-way.
"""

from __future__ import annotations

from clickhouse_connect.driver.client import Client

from .rows import TABLE_FOR_KIND, columns_of

# The columns that identify the sequence an event belongs to; the raw tables' sorting keys say the same.
_SEQUENCE = {"gpu_sample": ("run_id", "host", "rank")}
_DEFAULT_SEQUENCE = ("run_id",)
MAX_MARKS = 200_000  # sequences remembered; beyond that they are forgotten and learnt again


class StoredHighWater:
    def __init__(self, client: Client):
        self._client = client
        self._marks: dict[tuple, int] = {}

    def forget(self) -> None:
        self._marks.clear()

    def new_rows(self, kind: str, rows: list[list]) -> tuple[list[list], dict[tuple, int]]:
        """The rows not stored yet, and the marks that hold once they are (pass those to `advance`)."""
        if kind not in _TRACKED:
            return rows, {}
        columns = columns_of(kind)
        key_at = [columns.index(name) for name in _SEQUENCE.get(kind, _DEFAULT_SEQUENCE)]
        seq_at = columns.index("seq")
        table = TABLE_FOR_KIND[kind]
        keys = [tuple(row[i] for i in key_at) for row in rows]
        unknown = {key for key in keys if (table, *key) not in self._marks}
        if unknown:
            self._learn(kind, table, unknown)
        marks = self._marks
        pending: dict[tuple, int] = {}
        fresh = []
        for key, row in zip(keys, rows):
            mark_key = (table, *key)
            seq = row[seq_at]
            if seq > pending.get(mark_key, marks.get(mark_key, -1)):
                fresh.append(row)
                pending[mark_key] = seq
        return fresh, pending

    def advance(self, pending: dict[tuple, int]) -> None:
        if len(self._marks) + len(pending) > MAX_MARKS:
            self._marks.clear()
        self._marks.update(pending)

    def _learn(self, kind: str, table: str, keys: set[tuple]) -> None:
        names = _SEQUENCE.get(kind, _DEFAULT_SEQUENCE)
        run_ids = sorted({key[0] for key in keys})
        result = self._client.query(
            f"SELECT {', '.join(names)}, max(seq) FROM {table} WHERE run_id IN {{run_ids:Array(String)}} "
            f"GROUP BY {', '.join(names)}",
            parameters={"run_ids": run_ids},
        )
        for row in result.result_rows:
            self._marks[(table, *row[:-1])] = row[-1]
        for key in keys:  # sequences with nothing stored start below the first seq, 0
            self._marks.setdefault((table, *key), -1)


# Alerts are made by consumers, identified by their incident, and re-made on replay on purpose; not tracked.
_TRACKED = frozenset(TABLE_FOR_KIND) - {"alert"}
