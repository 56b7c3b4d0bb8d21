"""Writes batches of rows into ClickHouse; a batch is durable once `write` returns. Events already stored
(a redelivery) are left out, so every event is inserted once and the rollup views count it once.

A row ClickHouse refuses (a value its column cannot hold, say) must not hold up the rows around it: on a data
error the insert is split in halves until the refused rows stand alone, and those are handed back to be
dead-lettered while the rest is stored. Only errors of the connection or of the server's state are retried.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

from trainwire.infra.store.connect import RETENTION_TABLES

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
    refused: list[tuple[Any, str]] = field(default_factory=list)  # (the row's source, why)


class ClickHouseWriter:
    def __init__(self, client: Client):
        self._client = client
        self._stored = StoredEvents(client)
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
        started = time.perf_counter()
        result = WriteResult()
        try:
            for kind, rows in rows_by_kind.items():
                sources = (sources_by_kind or {}).get(kind) or [None] * len(rows)
                fresh = self._stored.fresh(kind, rows)
                result.redeliveries_skipped += len(rows) - len(fresh)
                if len(fresh) != len(rows):
                    rows, sources = [rows[i] for i in fresh], [sources[i] for i in fresh]
                for chunk in _partition_sized(kind, list(range(len(rows))), rows):
                    self._insert_or_split(kind, [rows[i] for i in chunk], [sources[i] for i in chunk], result)
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

    def _insert_or_split(self, kind: str, rows: list[list], sources: list[Any], result: WriteResult) -> None:
        """Insert `rows`; on a data error, halve until each refused row stands alone and is handed back."""
        try:
            self._insert(kind, rows)
        except Exception as err:
            if not is_data_error(err):
                raise
            if len(rows) == 1:
                log.warning("ClickHouse refused a %s row: %s", kind, _reason(err))
                result.refused.append((sources[0], _reason(err)))
                return
            middle = len(rows) // 2
            self._insert_or_split(kind, rows[:middle], sources[:middle], result)
            self._insert_or_split(kind, rows[middle:], sources[middle:], result)
            return
        self._stored.stored(kind, rows)
        self.rows_written += len(rows)
        if kind != "alert":
            result.inserted += len(rows)

    def _insert(self, kind: str, rows: list[list]) -> None:
        # column-oriented: clickhouse-connect then skips its own row → column pass
        self._client.insert(TABLE_FOR_KIND[kind], [list(c) for c in zip(*rows)], column_names=columns_of(kind),
                            column_oriented=True)

    def close(self) -> None:
        self._client.close()


def _partition_sized(kind: str, indices: list[int], rows: Sequence[list]) -> list[list[int]]:
    """The rows' indices in groups that each touch at most MAX_DAYS_PER_INSERT of the table's daily partitions
    (one group, in order, in the usual case of a batch within a few days)."""
    if not indices:
        return []
    if TABLE_FOR_KIND[kind] not in PARTITIONED_BY_DAY:
        return [indices]
    ts_at = columns_of(kind).index("ts")
    day_of = {i: rows[i][ts_at] // DAY_MS for i in indices}
    if len(set(day_of.values())) <= MAX_DAYS_PER_INSERT:
        return [indices]
    groups: list[list[int]] = []
    days: set[int] = set()
    for i in sorted(indices, key=day_of.__getitem__):
        if day_of[i] not in days and len(days) == MAX_DAYS_PER_INSERT:
            groups.append([])
            days = set()
        if not groups:
            groups.append([])
        groups[-1].append(i)
        days.add(day_of[i])
    return groups
