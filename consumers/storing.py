"""The insert step: a batch's rows, frames and alerts into ClickHouse, in a worker thread of its own.

ClickHouse (chdb or the HTTP client) releases the GIL while it writes, so the poll thread reads, parses and judges
the next batch meanwhile. One batch is stored at a time and its result is taken back by the poll thread, which
publishes and commits in batch order: an offset is never committed before its batch is stored.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from trainwire.infra.log import Record

from .batch import Batch
from .rows import to_row
from .writer import ClickHouseWriter


@dataclass
class Stored:
    inserted: int = 0  # events (alerts aside)
    redeliveries_skipped: int = 0
    refused: list[tuple[Record | None, str]] = field(default_factory=list)  # None: an alert row
    seconds: float = 0.0


class BatchStore:
    def __init__(self, writer: ClickHouseWriter):
        self._writer = writer
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest-insert")

    def submit(self, batch: Batch) -> Future[Stored]:
        return self._worker.submit(self.store, batch)

    def store(self, batch: Batch) -> Stored:
        """Insert what the batch holds that is not stored yet; raises StoreWriteError when the store is unavailable."""
        started = time.perf_counter()
        rows = dict(batch.rows)
        if batch.alerts:
            rows["alert"] = [to_row("alert", alert.model_dump()) for alert in batch.alerts]
        written = self._writer.write(rows, batch.sources)
        stored = Stored(written.inserted, written.redeliveries_skipped, list(written.refused))
        if frames := batch.frames():
            written = self._writer.write_frames(frames)
            stored.inserted += written.inserted
            stored.redeliveries_skipped += written.redeliveries_skipped
            stored.refused += [(batch.records[position], reason) for position, reason in written.refused]
        stored.seconds = time.perf_counter() - started
        return stored

    def close(self) -> None:
        self._worker.shutdown(wait=True)
