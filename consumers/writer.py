"""Writes batches of rows into ClickHouse; a batch is durable once `write` returns."""

from __future__ import annotations

import logging
import time

from clickhouse_connect.driver.client import Client

from .rows import TABLE_FOR_KIND, columns_of

log = logging.getLogger(__name__)
DEAD_LETTER_COLUMNS = ["topic", "partition", "offset", "reason", "payload"]


class StoreWriteError(RuntimeError):
    pass


class ClickHouseWriter:
    def __init__(self, client: Client):
        self._client = client
        self.rows_written = 0
        self.last_insert_seconds = 0.0

    def write(self, rows_by_kind: dict[str, list[list]], dead_letters: list[list]) -> None:
        started = time.perf_counter()
        try:
            for kind, rows in rows_by_kind.items():
                if rows:  # column-oriented: clickhouse-connect then skips its own row → column pass
                    self._client.insert(TABLE_FOR_KIND[kind], [list(c) for c in zip(*rows)],
                                        column_names=columns_of(kind), column_oriented=True)
                    self.rows_written += len(rows)
            if dead_letters:
                self._client.insert("dead_letters", dead_letters, column_names=DEAD_LETTER_COLUMNS)
        except Exception as err:
            raise StoreWriteError(f"insert into ClickHouse failed: {err}") from err
        self.last_insert_seconds = time.perf_counter() - started

    def close(self) -> None:
        self._client.close()
