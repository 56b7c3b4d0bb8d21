"""Writes batches of rows into ClickHouse; a batch is durable once `write` returns. Events already stored
(a redelivery) are left out, so every event is inserted once and the rollup views count it once."""

from __future__ import annotations

import logging
import time

from clickhouse_connect.driver.client import Client

from .rows import TABLE_FOR_KIND, columns_of
from .stored import StoredHighWater

log = logging.getLogger(__name__)
DEAD_LETTER_COLUMNS = ["topic", "partition", "offset", "reason", "payload"]


class StoreWriteError(RuntimeError):
    pass


class ClickHouseWriter:
    def __init__(self, client: Client):
        self._client = client
        self._stored = StoredHighWater(client)
        self.rows_written = 0
        self.redeliveries_skipped = 0
        self.last_insert_seconds = 0.0

    def forget_stored(self) -> None:
        """Another writer may now store these partitions' events: learn what is stored from the store again."""
        self._stored.forget()

    def write(self, rows_by_kind: dict[str, list[list]], dead_letters: list[list]) -> int:
        """Insert the rows not stored before; returns how many event rows (alerts aside) were inserted."""
        started = time.perf_counter()
        inserted = 0
        try:
            for kind, rows in rows_by_kind.items():
                fresh, marks = self._stored.new_rows(kind, rows)
                self.redeliveries_skipped += len(rows) - len(fresh)
                if fresh:  # column-oriented: clickhouse-connect then skips its own row → column pass
                    self._client.insert(TABLE_FOR_KIND[kind], [list(c) for c in zip(*fresh)],
                                        column_names=columns_of(kind), column_oriented=True)
                    self.rows_written += len(fresh)
                    inserted += len(fresh) if kind != "alert" else 0
                self._stored.advance(marks)
            if dead_letters:
                self._client.insert("dead_letters", dead_letters, column_names=DEAD_LETTER_COLUMNS)
        except Exception as err:
            self._stored.forget()  # part of the batch may be stored: learn what from the store on the retry
            raise StoreWriteError(f"insert into ClickHouse failed: {err}") from err
        self.last_insert_seconds = time.perf_counter() - started
        return inserted

    def close(self) -> None:
        self._client.close()
