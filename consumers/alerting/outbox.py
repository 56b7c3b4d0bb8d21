"""The durable record of what each sink must deliver and has delivered: a SQLite file under TRAINWIRE_HOME.

The alert consumer commits its Kafka offsets only once the alerts it read are here, so none is lost; one row per
(sink, de-duplication key, state) makes a redelivered alert a no-op, so no incident pages twice. Sink workers claim
due rows under a lease (another process on the same file skips them), and a resolution waits for its incident's
firing page to go out first.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from trainwire.infra.log.sqlite import use_wal
from trainwire.schemas import Alert

KEEP_SECONDS = 30 * 24 * 3600.0  # delivered and failed rows, for `trainwire alerts status` and audits

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    sink TEXT NOT NULL, dedup_key TEXT NOT NULL, state TEXT NOT NULL, alert TEXT NOT NULL,
    enqueued_at REAL NOT NULL, status TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL NOT NULL, lease_until REAL NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '', delivered_at REAL,
    PRIMARY KEY (sink, dedup_key, state)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (sink, status, next_attempt_at);
"""


@dataclass(frozen=True)
class Delivery:
    sink: str
    alert: Alert
    attempts: int
    enqueued_at: float


class Outbox:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()  # one connection shared by the consumer and the sink workers
        with self._lock:
            use_wal(self._conn)
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.executescript(_SCHEMA)
            self._conn.execute("DELETE FROM outbox WHERE status != 'pending' AND enqueued_at < ?",
                               (time.time() - KEEP_SECONDS,))

    def enqueue(self, deliveries: list[tuple[str, Alert]]) -> int:
        """Record what each sink must deliver, in one transaction; returns how many were new."""
        now = time.time()
        rows = [(sink, alert.dedup_key, alert.state, alert.model_dump_json(), now, now) for sink, alert in deliveries]
        with self._lock:
            before = self._conn.total_changes
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany(
                    "INSERT OR IGNORE INTO outbox (sink, dedup_key, state, alert, enqueued_at, next_attempt_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)", rows)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            return self._conn.total_changes - before

    def claim(self, sink: str, lease_seconds: float, limit: int = 20) -> list[Delivery]:
        """Due pending deliveries of `sink`, oldest first, leased to the caller; resolutions whose firing page is
        still pending wait for it."""
        now = time.time()
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                rows = self._conn.execute(
                    "SELECT dedup_key, state, alert, attempts, enqueued_at FROM outbox AS o "
                    "WHERE sink = ? AND status = 'pending' AND next_attempt_at <= ? AND lease_until <= ? "
                    "AND NOT (state = 'resolved' AND EXISTS (SELECT 1 FROM outbox AS f WHERE f.sink = o.sink "
                    "  AND f.dedup_key = o.dedup_key AND f.state = 'firing' AND f.status = 'pending')) "
                    "ORDER BY enqueued_at LIMIT ?", (sink, now, now, limit)).fetchall()
                self._conn.executemany(
                    "UPDATE outbox SET lease_until = ? WHERE sink = ? AND dedup_key = ? AND state = ?",
                    [(now + lease_seconds, sink, key, state) for key, state, *_ in rows])
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return [Delivery(sink, Alert.model_validate_json(alert), attempts, enqueued)
                for _key, _state, alert, attempts, enqueued in rows]

    def delivered(self, delivery: Delivery) -> None:
        self._settle(delivery, "status = 'delivered', delivered_at = ?, attempts = attempts + 1, lease_until = 0",
                     (time.time(),))

    def retry_at(self, delivery: Delivery, when: float, error: str) -> None:
        self._settle(delivery, "attempts = attempts + 1, next_attempt_at = ?, last_error = ?, lease_until = 0",
                     (when, error))

    def failed(self, delivery: Delivery, error: str) -> None:
        self._settle(delivery, "status = 'failed', attempts = attempts + 1, last_error = ?, lease_until = 0",
                     (error,))

    def _settle(self, delivery: Delivery, assignments: str, values: tuple) -> None:
        with self._lock:
            self._conn.execute(f"UPDATE outbox SET {assignments} WHERE sink = ? AND dedup_key = ? AND state = ?",
                               (*values, delivery.sink, delivery.alert.dedup_key, delivery.alert.state))

    def next_due(self, sink: str) -> float | None:
        """When the sink's earliest pending delivery is due (None: nothing pending)."""
        with self._lock:
            (due,) = self._conn.execute("SELECT min(max(next_attempt_at, lease_until)) FROM outbox "
                                        "WHERE sink = ? AND status = 'pending'", (sink,)).fetchone()
        return due

    def summary(self) -> list[dict]:
        """Per sink: pending, delivered and failed counts, the oldest pending page's age and the last error."""
        now = time.time()
        with self._lock:
            rows = self._conn.execute(
                "SELECT sink, sum(status = 'pending'), sum(status = 'delivered'), sum(status = 'failed'), "
                "min(CASE WHEN status = 'pending' THEN enqueued_at END), "
                "(SELECT last_error FROM outbox AS e WHERE e.sink = o.sink AND last_error != '' "
                " ORDER BY coalesce(delivered_at, next_attempt_at) DESC LIMIT 1) "
                "FROM outbox AS o GROUP BY sink ORDER BY sink").fetchall()
        return [{"sink": sink, "pending": pending, "delivered": delivered, "failed": failed,
                 "oldest_pending_seconds": round(now - oldest, 1) if oldest else None, "last_error": error or ""}
                for sink, pending, delivered, failed, oldest, error in rows]

    def failures(self, limit: int = 20) -> list[dict]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT sink, dedup_key, state, attempts, last_error FROM outbox WHERE status = 'failed' "
                "ORDER BY enqueued_at DESC LIMIT ?", (limit,)).fetchall()
        return [dict(zip(("sink", "dedup_key", "state", "attempts", "error"), row)) for row in rows]

    def close(self) -> None:
        with self._lock:
            self._conn.close()
