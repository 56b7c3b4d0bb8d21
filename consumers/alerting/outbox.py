"""The durable record of what each sink must deliver and has delivered: a SQLite file under TRAINWIRE_HOME.

The alert consumer commits its Kafka offsets only once the alerts it read are here, so none is lost; one row per
(sink, de-duplication key, state) makes a redelivered alert a no-op, so no incident pages twice. A sink worker
claims one due page at a time, the one it is about to send, under a lease: another process on the same file skips
it while its holder is alive, and takes it over as soon as the holder is known dead (see holders.py) or, for a
holder on another machine, once it stops renewing its short lease. Recording the outcome releases the lease in the
same statement. A resolution waits for its incident's firing page to go out first.

Rows are delivered as pages. Most pages are one row (`page` empty), sent under the alert's de-duplication key. A
bundle (`page` names it: a storm's batch, what a rate limit held back, what a silence held) is sent once for all
its rows, under its own key, and resolved once every incident in it has resolved: until then its resolutions are
`waiting`. Rows recorded but never sent (the paging policy decides, see paging.py): `silenced` (a silence matched),
`merged` (a crossing folded into an incident already paged: it fired again within the hold, or it is flapping) and
`superseded` (a held resolution that firing again called off).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from trainwire.infra.log.sqlite import use_wal
from trainwire.infra.redact import redact_text
from trainwire.schemas import Alert

from . import holders

log = logging.getLogger(__name__)
KEEP_SECONDS = 30 * 24 * 3600.0  # delivered and failed rows, for `trainwire alerts status` and audits
# How long a holder on another machine keeps a page without renewing; renewed every quarter of it while alive.
LEASE_SECONDS = 10.0
RATE_WINDOW_SECONDS = 60.0
SENT = ("pending", "delivered", "failed")  # rows that are (or will be) part of a page sent
UNSENT = ("silenced", "merged", "superseded")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    sink TEXT NOT NULL, dedup_key TEXT NOT NULL, state TEXT NOT NULL, alert TEXT NOT NULL,
    enqueued_at REAL NOT NULL, status TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL NOT NULL, lease_until REAL NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '', delivered_at REAL, holder TEXT NOT NULL DEFAULT '',
    page TEXT NOT NULL DEFAULT '', kind TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (sink, dedup_key, state)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (sink, status, next_attempt_at);
"""
# Columns added since the first outbox: another process may be adding them too.
_ADDED_COLUMNS = {"holder": "TEXT NOT NULL DEFAULT ''", "page": "TEXT NOT NULL DEFAULT ''",
                  "kind": "TEXT NOT NULL DEFAULT ''"}
_INDEXES = """
CREATE INDEX IF NOT EXISTS outbox_held ON outbox (holder) WHERE holder != '';
CREATE INDEX IF NOT EXISTS outbox_pages ON outbox (sink, page, state) WHERE page != '';
CREATE INDEX IF NOT EXISTS outbox_sent ON outbox (sink, delivered_at) WHERE status = 'delivered';
"""
_LEASE_FREE = "(lease_until <= :now AND holder = '' OR holder != '' AND may_take_over(holder, lease_until))"


@dataclass(frozen=True)
class Delivery:
    sink: str
    alert: Alert  # what is sent: the alert, or for a bundle its first alert under the bundle's key
    attempts: int
    enqueued_at: float
    # The holder of an attempt whose outcome was never recorded (it died while sending): the page may have
    # reached the receiver already. "" for a page never sent, or whose failure was recorded.
    unsettled_attempt_by: str = ""
    members: tuple[Alert, ...] = ()  # a bundle's alerts, oldest first; empty for a page of one alert
    kind: str = ""  # "", "flapping", "group", "rate_limited", "silence_ended"
    keys: tuple[str, ...] = ()  # the de-duplication keys of the rows this page settles

    @property
    def row_keys(self) -> tuple[str, ...]:
        return self.keys or (self.alert.dedup_key,)


def settle_bundle_resolutions(conn: sqlite3.Connection, sink: str, page: str) -> None:
    """A bundle resolves once every incident in it has: its resolutions wait (`waiting`) until the last one comes,
    then all are due together, when the latest of them is."""
    if not page:
        return
    incidents = {key for (key,) in conn.execute(
        "SELECT dedup_key FROM outbox WHERE sink = ? AND page = ? AND state = 'firing' AND status IN "
        "('pending', 'delivered', 'failed')", (sink, page))}
    resolved = dict(conn.execute(
        "SELECT dedup_key, next_attempt_at FROM outbox WHERE sink = ? AND page = ? AND state = 'resolved' "
        "AND status IN ('pending', 'waiting') AND holder = ''", (sink, page)).fetchall())
    if not resolved:
        return
    if incidents <= resolved.keys():
        conn.execute("UPDATE outbox SET status = 'pending', next_attempt_at = ? WHERE sink = ? AND page = ? "
                     "AND state = 'resolved' AND status IN ('pending', 'waiting') AND holder = ''",
                     (max(resolved.values()), sink, page))
    else:
        conn.execute("UPDATE outbox SET status = 'waiting' WHERE sink = ? AND page = ? AND state = 'resolved' "
                     "AND status = 'pending' AND holder = ''", (sink, page))


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
            self._add_columns()
            self._conn.executescript(_INDEXES)
            self._conn.execute("DELETE FROM outbox WHERE status NOT IN ('pending', 'waiting') AND enqueued_at < ?",
                               (time.time() - KEEP_SECONDS,))

    def _add_columns(self) -> None:
        """To an outbox written by an earlier trainwire."""
        present = {row[1] for row in self._conn.execute("PRAGMA table_info(outbox)")}
        for name, definition in _ADDED_COLUMNS.items():
            if name in present:
                continue
            try:
                self._conn.execute(f"ALTER TABLE outbox ADD COLUMN {name} {definition}")
            except sqlite3.OperationalError as err:
                if "duplicate column" not in str(err):
                    raise

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """The connection, in one write transaction (the paging policy records its decisions in it)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def enqueue(self, deliveries: list[tuple[str, Alert]]) -> int:
        """Record what each sink must deliver, each alert a page of its own, in one transaction; returns how many
        were new."""
        now = time.time()
        rows = [(sink, alert.dedup_key, alert.state, alert.model_dump_json(), now, now) for sink, alert in deliveries]
        with self.transaction() as conn:
            before = conn.total_changes
            conn.executemany(
                "INSERT OR IGNORE INTO outbox (sink, dedup_key, state, alert, enqueued_at, next_attempt_at) "
                "VALUES (?, ?, ?, ?, ?, ?)", rows)
            return conn.total_changes - before

    def claim(self, sink: str) -> Delivery | None:
        """The oldest due pending page of `sink` (all its rows), leased to this outbox until its outcome is
        recorded; a resolution whose firing page is still pending waits for it. A page held by a live holder is
        skipped."""
        now = time.time()
        with self.transaction() as conn:
            row = conn.execute(
                "SELECT dedup_key, state, page FROM outbox AS o "
                f"WHERE sink = :sink AND status = 'pending' AND next_attempt_at <= :now AND {_LEASE_FREE} "
                "AND NOT (state = 'resolved' AND EXISTS (SELECT 1 FROM outbox AS f WHERE f.sink = o.sink "
                "  AND f.state = 'firing' AND f.status = 'pending' "
                "  AND (f.dedup_key = o.dedup_key OR o.page != '' AND f.page = o.page))) "
                "ORDER BY enqueued_at LIMIT 1", {"sink": sink, "now": now}).fetchone()
            if row is None:
                return None
            key, state, page = row
            which = "page = :page" if page else "dedup_key = :key"
            rows = conn.execute(
                "SELECT dedup_key, alert, attempts, enqueued_at, holder, kind FROM outbox "
                f"WHERE sink = :sink AND state = :state AND {which} AND status = 'pending' "
                f"AND next_attempt_at <= :now AND {_LEASE_FREE} ORDER BY enqueued_at, dedup_key",
                {"sink": sink, "state": state, "page": page, "key": key, "now": now}).fetchall()
            conn.executemany(
                "UPDATE outbox SET holder = ?, lease_until = ? WHERE sink = ? AND dedup_key = ? AND state = ?",
                [(self.holder, now + self._lease, sink, r[0], state) for r in rows])
        self._keep_leases()
        return _delivery(sink, page, rows)

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
        self._settle(delivery, "attempts = attempts + 1, next_attempt_at = ?, last_error = ?",
                     (when, redact_text(error)))

    def failed(self, delivery: Delivery, error: str) -> None:
        self._settle(delivery, "status = 'failed', attempts = attempts + 1, last_error = ?", (redact_text(error),))

    def _settle(self, delivery: Delivery, assignments: str, values: tuple, held_only: bool = True) -> None:
        """Record an attempt's outcome and release its lease in one statement, for the rows the page was claimed
        with. A failure is recorded only while this outbox still holds the page: one that was taken over belongs
        to its new holder."""
        keys = delivery.row_keys
        held = " AND holder = ?" if held_only else ""
        with self._lock:
            self._conn.execute(
                f"UPDATE outbox SET {assignments}, holder = '', lease_until = 0 WHERE sink = ? AND state = ? "
                f"AND dedup_key IN ({', '.join('?' * len(keys))}) AND status = 'pending'{held}",
                (*values, delivery.sink, delivery.alert.state, *keys, *((self.holder,) if held_only else ())))

    def rate_limited_until(self, sink: str, per_minute: int) -> float | None:
        """When `sink` may send its next firing page under a limit of `per_minute` (None: now)."""
        now = time.time()
        with self._lock:
            sent = [at for (at,) in self._conn.execute(
                "SELECT min(delivered_at) FROM outbox WHERE sink = ? AND status = 'delivered' AND state = 'firing' "
                "AND delivered_at > ? GROUP BY CASE page WHEN '' THEN dedup_key ELSE page END ORDER BY 1",
                (sink, now - RATE_WINDOW_SECONDS))]
        if len(sent) < per_minute:
            return None
        return sent[len(sent) - per_minute] + RATE_WINDOW_SECONDS

    def hold_back(self, delivery: Delivery, until: float) -> str:
        """Move a firing page the rate limit holds back into the sink's summary page, due `until`: one page that
        lists everything held back (and resolves once all of it has). Returns the summary's key."""
        keys = delivery.row_keys
        marks = ", ".join("?" * len(keys))
        with self.transaction() as conn:
            open_summary = conn.execute(
                "SELECT page FROM outbox WHERE sink = ? AND kind = 'rate_limited' AND state = 'firing' "
                "AND status = 'pending' LIMIT 1", (delivery.sink,)).fetchone()
            page = open_summary[0] if open_summary else f"rate-limited/{delivery.sink}/{int(time.time() * 1000)}"
            conn.execute(f"UPDATE outbox SET page = ?, kind = 'rate_limited', holder = '', lease_until = 0 "
                         f"WHERE sink = ? AND state = 'firing' AND dedup_key IN ({marks}) AND status = 'pending'",
                         (page, delivery.sink, *keys))
            conn.execute("UPDATE outbox SET next_attempt_at = ? WHERE sink = ? AND page = ? AND state = 'firing' "
                         "AND status = 'pending'", (until, delivery.sink, page))
            conn.execute(f"UPDATE outbox SET page = ?, kind = 'rate_limited' WHERE sink = ? AND state = 'resolved' "
                         f"AND dedup_key IN ({marks})", (page, delivery.sink, *keys))
            settle_bundle_resolutions(conn, delivery.sink, page)
        return page

    def next_due(self, sink: str) -> float | None:
        """When the sink's earliest pending delivery is due (None: nothing pending)."""
        with self._lock:
            (due,) = self._conn.execute("SELECT min(max(next_attempt_at, lease_until)) FROM outbox "
                                        "WHERE sink = ? AND status = 'pending'", (sink,)).fetchone()
        return due

    def pending_due_by(self, moment: float) -> int:
        """Pending rows due by `moment` (held ones due later, such as a resolution held back, are not counted)."""
        with self._lock:
            return self._conn.execute("SELECT count(*) FROM outbox WHERE status = 'pending' AND next_attempt_at <= ?",
                                      (moment,)).fetchone()[0]

    def summary(self) -> list[dict]:
        """Per sink: pending, delivered and failed counts, the oldest pending page's age and the last error; and
        what was recorded but not sent: silenced, and suppressed (merged into a page sent, flapping)."""
        now = time.time()
        with self._lock:
            rows = self._conn.execute(
                "SELECT sink, sum(status = 'pending'), sum(status = 'delivered'), sum(status = 'failed'), "
                "min(CASE WHEN status = 'pending' THEN enqueued_at END), "
                "(SELECT last_error FROM outbox AS e WHERE e.sink = o.sink AND last_error != '' "
                " ORDER BY coalesce(delivered_at, next_attempt_at) DESC LIMIT 1), "
                "sum(status = 'silenced'), sum(status IN ('merged', 'superseded')), sum(status = 'waiting') "
                "FROM outbox AS o GROUP BY sink ORDER BY sink").fetchall()
        return [{"sink": sink, "pending": pending, "delivered": delivered, "failed": failed,
                 "oldest_pending_seconds": round(now - oldest, 1) if oldest else None,
                 "last_error": redact_text(error or ""),  # rows stored before errors were redacted, too
                 "silenced": silenced, "suppressed": suppressed, "waiting": waiting}
                for sink, pending, delivered, failed, oldest, error, silenced, suppressed, waiting in rows]

    def failures(self, limit: int = 20) -> list[dict]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT sink, dedup_key, state, attempts, last_error FROM outbox WHERE status = 'failed' "
                "ORDER BY enqueued_at DESC LIMIT ?", (limit,)).fetchall()
        return [{"sink": sink, "dedup_key": key, "state": state, "attempts": attempts, "error": redact_text(error)}
                for sink, key, state, attempts, error in rows]

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


def _delivery(sink: str, page: str, rows: list[tuple]) -> Delivery:
    """The page made of the claimed rows: one alert as it is, or a bundle under the bundle's key."""
    alerts = tuple(Alert.model_validate_json(r[1]) for r in rows)
    attempts, enqueued = max(r[2] for r in rows), min(r[3] for r in rows)
    previous = next((r[4] for r in rows if r[4]), "")
    keys = tuple(r[0] for r in rows)
    if len(alerts) == 1:
        return Delivery(sink, alerts[0], attempts, enqueued, previous, kind=rows[0][5], keys=keys)
    first = alerts[0].model_copy(update={"dedup_key": page})
    return Delivery(sink, first, attempts, enqueued, previous, members=alerts, kind=rows[0][5], keys=keys)
