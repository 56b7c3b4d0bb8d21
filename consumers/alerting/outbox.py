"""The durable record of what each sink must deliver and has delivered: a SQLite file under TRAINWIRE_HOME.

The alert consumer commits its Kafka offsets only once the alerts it read are here, so none is lost; one row per
(sink, de-duplication key, state) makes a redelivered alert a no-op, so no incident pages twice. A sink worker
claims one due row at a time, the page it is about to send, under a lease: another process on the same file skips
it while its holder is alive, and takes it over as soon as the holder is known dead (see holders.py) or, for a
holder on another machine, once it stops renewing its short lease. Recording the outcome releases the lease in the
same statement. A resolution waits for its incident's firing page to go out first.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from trainwire.infra.log.sqlite import use_wal
from trainwire.schemas import Alert

from . import holders

log = logging.getLogger(__name__)
KEEP_SECONDS = 30 * 24 * 3600.0  # delivered and failed rows, for `trainwire alerts status` and audits
# How long a holder on another machine keeps a page without renewing; renewed every quarter of it while alive.
LEASE_SECONDS = 10.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    sink TEXT NOT NULL, dedup_key TEXT NOT NULL, state TEXT NOT NULL, alert TEXT NOT NULL,
    enqueued_at REAL NOT NULL, status TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL NOT NULL, lease_until REAL NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '', delivered_at REAL, holder TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (sink, dedup_key, state)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (sink, status, next_attempt_at);
"""
_HELD_INDEX = "CREATE INDEX IF NOT EXISTS outbox_held ON outbox (holder) WHERE holder != ''"


@dataclass(frozen=True)
class Delivery:
    sink: str
    alert: Alert
    attempts: int
    enqueued_at: float
    # The holder of an attempt whose outcome was never recorded (it died while sending): the page may have
    # reached the receiver already. "" for a page never sent, or whose failure was recorded.
    unsettled_attempt_by: str = ""


class Outbox:
    def __init__(self, path: Path, lease_seconds: float = LEASE_SECONDS):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.holder = holders.new_holder()
        self._lease = lease_seconds
        self._conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self._conn.create_function("may_take_over", 2, self._may_take_over)
        self._lock = threading.Lock()  # one connection shared by the consumer, the sink workers and the renewal
        self._closed = threading.Event()
        self._renewal: threading.Thread | None = None
        with self._lock:
            use_wal(self._conn)
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.executescript(_SCHEMA)
            self._add_holder_column()
            self._conn.execute(_HELD_INDEX)
            self._conn.execute("DELETE FROM outbox WHERE status != 'pending' AND enqueued_at < ?",
                               (time.time() - KEEP_SECONDS,))

    def _add_holder_column(self) -> None:
        """To an outbox written before leases named their holder (another process may be adding it too)."""
        if "holder" in {row[1] for row in self._conn.execute("PRAGMA table_info(outbox)")}:
            return
        try:
            self._conn.execute("ALTER TABLE outbox ADD COLUMN holder TEXT NOT NULL DEFAULT ''")
        except sqlite3.OperationalError as err:
            if "duplicate column" not in str(err):
                raise

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

    def claim(self, sink: str) -> Delivery | None:
        """The oldest due pending delivery of `sink`, leased to this outbox until its outcome is recorded; a
        resolution whose firing page is still pending waits for it. A page held by a live holder is skipped."""
        now = time.time()
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                row = self._conn.execute(
                    "SELECT dedup_key, state, alert, attempts, enqueued_at, holder FROM outbox AS o "
                    "WHERE sink = ? AND status = 'pending' AND next_attempt_at <= ? "
                    "AND (lease_until <= ? AND holder = '' OR holder != '' AND may_take_over(holder, lease_until)) "
                    "AND NOT (state = 'resolved' AND EXISTS (SELECT 1 FROM outbox AS f WHERE f.sink = o.sink "
                    "  AND f.dedup_key = o.dedup_key AND f.state = 'firing' AND f.status = 'pending')) "
                    "ORDER BY enqueued_at LIMIT 1", (sink, now, now)).fetchone()
                if row is not None:
                    self._conn.execute(
                        "UPDATE outbox SET holder = ?, lease_until = ? WHERE sink = ? AND dedup_key = ? AND state = ?",
                        (self.holder, now + self._lease, sink, row[0], row[1]))
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        if row is None:
            return None
        self._keep_leases()
        _key, _state, alert, attempts, enqueued, previous = row
        return Delivery(sink, Alert.model_validate_json(alert), attempts, enqueued, previous)

    def _may_take_over(self, holder: str, lease_until: float) -> bool:
        """A leased page is taken over from a holder known dead at once, from one this machine cannot check once its
        lease ran out, and never from a live one on this machine, however late its renewal."""
        if holder == self.holder:
            return True  # an outcome this outbox failed to record (the disk was full): its worker asks again
        alive = holders.is_alive(holder)
        return not alive if alive is not None else lease_until <= time.time()

    def _keep_leases(self) -> None:
        if self._renewal is None:
            self._renewal = threading.Thread(target=self._renew_leases, name="outbox-leases", daemon=True)
            self._renewal.start()

    def _renew_leases(self) -> None:
        while not self._closed.wait(self._lease / 4):
            try:
                with self._lock:
                    if self._closed.is_set():
                        return
                    self._conn.execute("UPDATE outbox SET lease_until = ? WHERE holder = ? AND holder != '' "
                                       "AND status = 'pending'", (time.time() + self._lease, self.holder))
            except sqlite3.Error as err:  # locked for long: the next renewal may get through before the lease ends
                log.warning("alerting: cannot renew the outbox leases of %s: %s", holders.describe(self.holder), err)

    def delivered(self, delivery: Delivery) -> None:
        """Recorded whoever holds the page now: it did reach the receiver."""
        self._settle(delivery, "status = 'delivered', delivered_at = ?, attempts = attempts + 1", (time.time(),),
                     held_only=False)

    def retry_at(self, delivery: Delivery, when: float, error: str) -> None:
        self._settle(delivery, "attempts = attempts + 1, next_attempt_at = ?, last_error = ?", (when, error))

    def failed(self, delivery: Delivery, error: str) -> None:
        self._settle(delivery, "status = 'failed', attempts = attempts + 1, last_error = ?", (error,))

    def _settle(self, delivery: Delivery, assignments: str, values: tuple, held_only: bool = True) -> None:
        """Record an attempt's outcome and release its lease in one statement. A failure is recorded only while
        this outbox still holds the page: one that was taken over belongs to its new holder."""
        held = " AND holder = ?" if held_only else ""
        with self._lock:
            self._conn.execute(
                f"UPDATE outbox SET {assignments}, holder = '', lease_until = 0 "
                f"WHERE sink = ? AND dedup_key = ? AND state = ? AND status = 'pending'{held}",
                (*values, delivery.sink, delivery.alert.dedup_key, delivery.alert.state,
                 *((self.holder,) if held_only else ())))

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
        """Release the pages this outbox still holds, so another process sends them at once. A page still held here
        is one whose outcome was not recorded (a worker that did not stop in time): it stays marked as such."""
        if self._closed.is_set():
            return
        self._closed.set()
        holders.let_go(self.holder)
        with self._lock:
            self._conn.execute("UPDATE outbox SET holder = ?, lease_until = 0 WHERE holder = ? AND holder != ''",
                               (holders.released(self.holder), self.holder))
            self._conn.close()
