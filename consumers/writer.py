"""Writes batches of rows into ClickHouse; a batch is durable once `write` returns. Events already stored
(a redelivery) are left out, so every event is inserted once and the rollup views count it once.

A row ClickHouse refuses (a value its column cannot hold, say) must not hold up the rows around it: on a data
error the insert is split in halves until the refused rows stand alone, and those are handed back to be
dead-lettered while the rest is stored. Only errors of the connection or of the server's state are retried.

Two entries share those guarantees: `write` takes rows (the per-record path, alerts), `write_frames` takes a
batch's frames (the columnar path) and hands ClickHouse the events' Avro bodies as they arrived, one Object
Container File per writer schema, so no Python touches a value on the way in.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

from trainwire.infra.store.connect import RETENTION_TABLES
from trainwire.schemas.events import LONG_MAX, LONG_MIN
from trainwire.schemas.ocf import container

from .frames import Frame, reader_schema
from .rows import TABLE_FOR_KIND, columns_of
from .stored import StoredEvents

log = logging.getLogger(__name__)
DEAD_LETTER_COLUMNS = ["topic", "partition", "offset", "reason", "payload"]
DAY_MS = 86_400_000
# Tables partitioned by day (PARTITION BY toDate(ts)), and how many days one insert may touch: ClickHouse
# refuses an insert block spread over more than max_partitions_per_insert_block (100 by default).
PARTITIONED_BY_DAY = frozenset(RETENTION_TABLES)
MAX_DAYS_PER_INSERT = 50

# Server error codes that say nothing about the rows: the server, the network or the cluster is unwell for now.
_TRANSIENT_CODES = frozenset({
    3,    # UNEXPECTED_END_OF_FILE (a connection cut mid-answer)
    159,  # TIMEOUT_EXCEEDED
    160,  # TOO_SLOW
    164,  # READONLY
    202,  # TOO_MANY_SIMULTANEOUS_QUERIES
    203,  # NO_FREE_CONNECTION
    209,  # SOCKET_TIMEOUT
    210,  # NETWORK_ERROR
    225,  # NO_ZOOKEEPER
    236,  # ABORTED
    241,  # MEMORY_LIMIT_EXCEEDED
    242,  # TABLE_IS_READ_ONLY
    285,  # TOO_FEW_LIVE_REPLICAS
    319,  # UNKNOWN_STATUS_OF_INSERT
    394,  # QUERY_WAS_CANCELLED
    425,  # SYSTEM_ERROR
    999,  # KEEPER_EXCEPTION
})
TOO_MANY_PARTS = 252  # transient under merge pressure; a data error when one block spans too many partitions
_CODE = re.compile(r"\bcode:? (\d+)", re.IGNORECASE)


class StoreWriteError(RuntimeError):
    """The store is unavailable for now: drop the batch and retry from the last commit."""


def is_data_error(err: Exception) -> bool:
    """True when ClickHouse refused the rows themselves (type, range, parse, partitions), so retrying the same
    rows can only fail again; False for the connection, the server's load or its state."""
    if isinstance(err, OperationalError):  # connection refused, reset, timed out
        return False
    if isinstance(err, DatabaseError):
        code = getattr(err, "code", None)
        if code is None and (match := _CODE.search(str(err))):
            code = int(match[1])
        if code == TOO_MANY_PARTS:
            return "single INSERT block" in str(err)
        if code is None:  # clickhouse-connect's own checks (DataError, ProgrammingError) name a row problem
            return type(err) is not DatabaseError
        return code not in _TRANSIENT_CODES
    return isinstance(err, (TypeError, ValueError, OverflowError, UnicodeError))


def _reason(err: Exception) -> str:
    """One line: ClickHouse's messages run to a stack trace."""
    text = " ".join(str(err).split())
    return f"ClickHouse refused the row: {text[:500]}"


@dataclass
class WriteResult:
    inserted: int = 0  # event rows (alerts aside)
    redeliveries_skipped: int = 0
    refused: list[tuple[Any, str]] = field(default_factory=list)  # (the row's source, or a frame row's position; why)


class _Part(Protocol):
    """Some rows of one kind that go into one insert, and can be halved when ClickHouse refuses it."""

    @property
    def kind(self) -> str: ...

    def __len__(self) -> int: ...

    def halves(self) -> tuple[_Part, _Part]: ...

    def source(self) -> Any:
        """What a refusal of this part (of one row) is reported with."""

    def insert(self, client: Client) -> None: ...

    def mark_stored(self, stored: StoredEvents) -> None: ...


@dataclass
class _RowPart:
    """Rows as lists of column values, inserted column-oriented (clickhouse-connect then skips its own pass)."""

    kind: str
    rows: list[list]
    sources: list[Any]

    def __len__(self) -> int:
        return len(self.rows)

    def halves(self) -> tuple[_RowPart, _RowPart]:
        middle = len(self.rows) // 2
        return (_RowPart(self.kind, self.rows[:middle], self.sources[:middle]),
                _RowPart(self.kind, self.rows[middle:], self.sources[middle:]))

    def source(self) -> Any:
        return self.sources[0]

    def insert(self, client: Client) -> None:
        client.insert(TABLE_FOR_KIND[self.kind], [list(c) for c in zip(*self.rows)], column_names=columns_of(self.kind),
                      column_oriented=True)

    def mark_stored(self, stored: StoredEvents) -> None:
        stored.stored(self.kind, self.rows)


@dataclass
class _FramePart:
    """Rows of a frame written with one writer schema: their Avro bodies, as they arrived, in one container whose
    schema is the writer's with `ts_ms` read as the table's `ts` (timestamp-millis: the same binary long)."""

    frame: Frame
    writer: str
    indices: np.ndarray

    @property
    def kind(self) -> str:
        return self.frame.kind

    def __len__(self) -> int:
        return len(self.indices)

    def halves(self) -> tuple[_FramePart, _FramePart]:
        middle = len(self.indices) // 2
        return (_FramePart(self.frame, self.writer, self.indices[:middle]),
                _FramePart(self.frame, self.writer, self.indices[middle:]))

    def source(self) -> Any:
        return int(self.frame.positions[self.indices[0]])

    def insert(self, client: Client) -> None:
        bodies = self.frame.bodies
        if len(self.indices) != len(bodies):
            bodies = [bodies[i] for i in self.indices.tolist()]
        client.raw_insert(TABLE_FOR_KIND[self.kind], None, insert_block=container(_stored_schema(self.writer), bodies),
                          fmt="Avro", settings={"input_format_avro_allow_missing_fields": 1})

    def mark_stored(self, stored: StoredEvents) -> None:
        stored.stored_rows(self.kind, self.frame.table, self.indices)


@cache
def _stored_schema(writer: str) -> str:
    """The writer schema as the table reads it: `ts_ms` named `ts`, a timestamp in milliseconds. Fields the
    writer lacks (an older version) take the column's default, which is the newest schema's default."""
    schema = json.loads(writer)
    for entry in schema["fields"]:
        if entry["name"] == "ts_ms":
            entry["name"], entry["type"] = "ts", {"type": "long", "logicalType": "timestamp-millis"}
    return json.dumps(schema)


@dataclass(frozen=True)
class _IntegerRange:
    """An integer column (or a field of the records of an array column) that holds less than an Avro long."""

    field: str  # the frame's field
    nested: str | None  # the record field inside an array field
    column: str
    type: str
    low: int | None  # None: a long's own bound
    high: int | None

    def outside(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """(rows, offending values) of the rows holding a value outside the range."""
        values = table.column(self.field).combine_chunks()
        rows = None
        if self.nested is not None:
            rows = pc.list_parent_indices(values).to_numpy()
            values = pc.struct_field(pc.list_flatten(values), self.nested)
        bad = np.zeros(len(values), dtype=bool)
        if self.low is not None:
            bad |= pc.fill_null(pc.less(values, self.low), False).to_numpy(zero_copy_only=False)
        if self.high is not None:
            bad |= pc.fill_null(pc.greater(values, self.high), False).to_numpy(zero_copy_only=False)
        at = np.flatnonzero(bad)
        return (at if rows is None else rows[at]), values.take(pa.array(at)).to_numpy(zero_copy_only=False)


_INTEGER_TYPE = re.compile(r"^(?:(?:Nullable|Array|LowCardinality)\()*(U?)Int(8|16|32|64)\)*$")


class ClickHouseWriter:
    def __init__(self, client: Client):
        self._client = client
        self._stored = StoredEvents(client)
        self._ranges: dict[str, list[_IntegerRange]] = {}
        self.rows_written = 0
        self.redeliveries_skipped = 0
        self.last_insert_seconds = 0.0

    def forget_stored(self) -> None:
        """Another writer may now store these partitions' events: learn what is stored from the store again."""
        self._stored.forget()

    def write(self, rows_by_kind: dict[str, list[list]], sources_by_kind: dict[str, list[Any]] | None = None,
              ) -> WriteResult:
        """Insert the rows not stored before. Rows ClickHouse refuses come back in `refused` with their source
        (from `sources_by_kind`, parallel to the rows); raises StoreWriteError when the store is unavailable."""

        def insert(result: WriteResult) -> None:
            for kind, rows in rows_by_kind.items():
                sources = (sources_by_kind or {}).get(kind) or [None] * len(rows)
                fresh = self._stored.fresh(kind, rows)
                result.redeliveries_skipped += len(rows) - len(fresh)
                ts_at = columns_of(kind).index("ts")
                ts_ms = np.array([rows[i][ts_at] for i in fresh], dtype=np.int64)
                for chunk in _partition_sized(kind, np.array(fresh, dtype=np.int64), ts_ms):
                    picked = chunk.tolist()
                    self._insert_or_split(_RowPart(kind, [rows[i] for i in picked], [sources[i] for i in picked]),
                                          result)

        return self._writing(insert)

    def write_frames(self, frames: Mapping[str, Frame]) -> WriteResult:
        """Insert the frames' events not stored before, with `write`'s guarantees; a refused row comes back in
        `refused` with its position (the index of its record in the batch)."""

        def insert(result: WriteResult) -> None:
            for kind, frame in frames.items():
                fresh = self._stored.fresh_mask(kind, frame.table)
                result.redeliveries_skipped += int(len(fresh) - fresh.sum())
                fresh &= ~self._refuse_out_of_range(frame, fresh, result)
                indices = np.flatnonzero(fresh)
                for chunk in _partition_sized(kind, indices, frame.table.column("ts_ms").to_numpy()[indices]):
                    writer_ids = frame.writer_ids[chunk]
                    for writer_id in np.unique(writer_ids).tolist():
                        part = _FramePart(frame, frame.writers[writer_id], chunk[writer_ids == writer_id])
                        self._insert_or_split(part, result)

        return self._writing(insert)

    def _writing(self, insert: Callable[[WriteResult], None]) -> WriteResult:
        """Run `insert`; any failure but a refused row means the store is unavailable (StoreWriteError)."""
        started = time.perf_counter()
        result = WriteResult()
        try:
            insert(result)
        except Exception as err:
            self._stored.forget()  # part of the batch may be stored: learn what from the store on the retry
            if isinstance(err, StoreWriteError):
                raise
            raise StoreWriteError(f"insert into ClickHouse failed: {' '.join(str(err).split())[:500]}") from err
        self.redeliveries_skipped += result.redeliveries_skipped
        self.last_insert_seconds = time.perf_counter() - started
        return result

    def write_dead_letters(self, dead_letters: list[list]) -> None:
        if not dead_letters:
            return
        try:
            self._client.insert("dead_letters", dead_letters, column_names=DEAD_LETTER_COLUMNS)
        except Exception as err:
            raise StoreWriteError(f"insert into dead_letters failed: {' '.join(str(err).split())[:500]}") from err

    def _insert_or_split(self, part: _Part, result: WriteResult) -> None:
        """Insert `part`; on a data error, halve until each refused row stands alone and is handed back."""
        try:
            part.insert(self._client)
        except Exception as err:
            if not is_data_error(err):
                raise
            if len(part) == 1:
                log.warning("ClickHouse refused a %s row: %s", part.kind, _reason(err))
                result.refused.append((part.source(), _reason(err)))
                return
            for half in part.halves():
                self._insert_or_split(half, result)
            return
        part.mark_stored(self._stored)
        self.rows_written += len(part)
        if part.kind != "alert":
            result.inserted += len(part)

    def _refuse_out_of_range(self, frame: Frame, fresh: np.ndarray, result: WriteResult) -> np.ndarray:
        """Per row: True when a fresh row holds an integer its column cannot; those rows are refused here.
        ClickHouse's Avro input would store such a value wrapped around (70000 in a UInt16 as 4464), where a
        row insert refuses it."""
        refused = np.zeros(frame.table.num_rows, dtype=bool)
        for limit in self._integer_ranges(frame.kind):
            rows, values = limit.outside(frame.table)
            for row, value in zip(rows.tolist(), values.tolist()):
                if fresh[row] and not refused[row]:
                    refused[row] = True
                    reason = (f"the store cannot hold the row: {value} is outside the range of column "
                              f"`{limit.column}` {limit.type}")
                    log.warning("refused a %s row: %s", frame.kind, reason)
                    result.refused.append((int(frame.positions[row]), reason))
        return refused

    def _integer_ranges(self, kind: str) -> list[_IntegerRange]:
        """The integer columns of the kind's table narrower than an Avro long, learnt once from the table."""
        if kind not in self._ranges:
            described = self._client.query(f"DESCRIBE TABLE {TABLE_FOR_KIND[kind]} "
                                           "SETTINGS describe_include_subcolumns = 1").result_rows
            types = {row[0]: row[1] for row in described}
            ranges = []
            for name in _integer_fields(kind):
                column = "ts" if name[0] == "ts_ms" else ".".join(name)
                match = _INTEGER_TYPE.match(types.get(column, ""))
                if not match:
                    continue
                bits = int(match[2])
                low, high = (0, 2**bits - 1) if match[1] else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
                if low > LONG_MIN or high < LONG_MAX:
                    ranges.append(_IntegerRange(name[0], name[1] if len(name) > 1 else None, column, types[column],
                                                low if low > LONG_MIN else None, high if high < LONG_MAX else None))
            self._ranges[kind] = ranges
        return self._ranges[kind]

    def close(self) -> None:
        self._client.close()


def _integer_fields(kind: str) -> list[tuple[str, ...]]:
    """The path of each integer field of the kind's frames: top-level, or in the records of an array."""
    found = []
    for entry in reader_schema(kind):
        if pa.types.is_integer(entry.type):
            found.append((entry.name,))
        elif pa.types.is_list(entry.type) and pa.types.is_struct(entry.type.value_type):
            found.extend((entry.name, sub.name) for sub in entry.type.value_type if pa.types.is_integer(sub.type))
    return found


def _partition_sized(kind: str, indices: np.ndarray, ts_ms: np.ndarray) -> list[np.ndarray]:
    """`indices` (of rows whose times are `ts_ms`, parallel) in groups that each touch at most MAX_DAYS_PER_INSERT
    of the table's daily partitions (one group, in order, in the usual case of a batch within a few days)."""
    if not len(indices):
        return []
    if TABLE_FOR_KIND[kind] not in PARTITIONED_BY_DAY:
        return [indices]
    days, day_of = np.unique(ts_ms // DAY_MS, return_inverse=True)
    if len(days) <= MAX_DAYS_PER_INSERT:
        return [indices]
    group_of = day_of // MAX_DAYS_PER_INSERT
    order = np.argsort(group_of, kind="stable")
    return np.split(indices[order], np.flatnonzero(np.diff(group_of[order])) + 1)
