"""The trainer side's way to Kafka: every message goes to a local SQLite spool first, then a forwarder thread
sends it to the broker and deletes it once the broker has acknowledged it.

So training never waits for the broker, an outage only makes the spool grow on disk, messages keep their order
(the forwarder sends in spool order through an idempotent producer), and a crash loses at most what had not
reached the spool. What is still spooled at exit stays on disk: the next producer on this machine (or
`trainwire spool replay`) adopts spools whose owner is gone and sends them. A message delivered but not yet
deleted when the process died is sent again; event ids make that one stored row.

The forwarder shares the process with training: idle, it sleeps until rows are spooled; busy, it hands rows to
librdkafka in slices of about a millisecond and sleeps briefly between them, so the training thread never waits long for the GIL, and a message in flight holds
no object the garbage collector tracks (its delivery is matched to its row by its bytes), so an outage that leaves
100,000 messages in flight does not make every full collection of the training process longer.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from ..config import Settings
from .base import LogProducer
from .kafka_client import describe_config_error, librdkafka_log, producer_config
from .sqlite import use_wal

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 100_000
READ_BATCH = 1_000
SLICE_SECONDS = 0.001  # the most the forwarder works without letting go of the GIL while rows wait
YIELD_SECONDS = 0.0002  # then a real sleep, so that a thread waiting for the GIL takes it
_NOT_ALLOWED = frozenset({KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.CLUSTER_AUTHORIZATION_FAILED})
IDLE_SECONDS = 0.5  # the longest an idle forwarder sleeps (a write wakes it at once): cleanup, a fatal error
_SCHEMA = """
CREATE TABLE IF NOT EXISTS pending (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, key BLOB,
                                    value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS rejected (id INTEGER PRIMARY KEY, topic TEXT, key BLOB, value BLOB, reason TEXT);
"""


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    use_wal(conn)
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(_SCHEMA)
    return conn


class Spool:
    """One spool file, owned by one process for as long as it holds the file lock beside it."""

    def __init__(self, path: Path, lock_fd: int):
        self.path = path
        self._lock_fd = lock_fd
        self._writer = _connect(path)
        self._reader = _connect(path)
        (self.written,) = self._reader.execute("SELECT count(*) FROM pending").fetchone()
        self.settled = 0  # rows delivered (or rejected) since this process took the spool
        self.next_id = 0  # next row to send
        self.acked = 0  # every row with id <= acked is settled
        self.deleted_through = 0
        self.outstanding: deque[int] = deque()
        self.delivered: set[int] = set()
        # row id of each message in flight, by its bytes (unique: every event has its own id); the delivery report
        # carries the bytes back. Plain values only: no closure per message for the garbage collector to walk.
        self.in_flight: dict[bytes, int] = {}
        self.on_delivery: Callable[[KafkaError | None, Message], None] | None = None  # set by its forwarder

    @classmethod
    def create(cls, directory: Path) -> Spool:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{socket.gethostname()}-{os.getpid()}-{time.time_ns() // 1_000_000}.db"
        spool = cls.try_own(path)
        assert spool is not None, f"a fresh spool {path} is locked by someone else"
        return spool

    @classmethod
    def try_own(cls, path: Path) -> Spool | None:
        """Take the spool at `path` if no live process holds it."""
        fd = os.open(f"{path}.lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return cls(path, fd)

    @classmethod
    def orphans(cls, directory: Path) -> list[Spool]:
        found = []
        for path in sorted(directory.glob("*.db")) if directory.is_dir() else []:
            spool = cls.try_own(path)
            if spool is not None:
                found.append(spool)
        return found

    def write(self, rows: list[tuple[str, bytes, bytes]]) -> None:
        with self._writer:
            self._writer.execute("BEGIN IMMEDIATE")
            self._writer.executemany("INSERT INTO pending (topic, key, value) VALUES (?, ?, ?)", rows)
        self.written += len(rows)

    def read(self, limit: int) -> list[tuple[int, str, bytes, bytes]]:
        rows = self._reader.execute(
            "SELECT id, topic, key, value FROM pending WHERE id >= ? ORDER BY id LIMIT ?", (self.next_id, limit)
        ).fetchall()
        if rows:
            self.next_id = rows[-1][0] + 1
        return rows

    def mark_delivered(self, row_id: int) -> None:
        self.settled += 1
        self.delivered.add(row_id)
        while self.outstanding and self.outstanding[0] in self.delivered:
            self.delivered.discard(self.outstanding[0])
            self.acked = self.outstanding.popleft()

    def reject(self, row: tuple[int, str, bytes, bytes], reason: str) -> None:
        self._reader.execute("INSERT OR REPLACE INTO rejected VALUES (?, ?, ?, ?, ?)", (*row, reason))

    def delete_acked(self) -> None:
        if self.acked > self.deleted_through:
            self._reader.execute("DELETE FROM pending WHERE id <= ?", (self.acked,))
            self.deleted_through = self.acked

    def undelivered(self) -> int:
        return self.written - self.settled

    def close(self, remove_if_empty: bool) -> None:
        self.delete_acked()
        empty = self.undelivered() == 0
        (rejected,) = self._reader.execute("SELECT count(*) FROM rejected").fetchone()
        self._writer.close()
        self._reader.close()
        if remove_if_empty and empty and not rejected:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            Path(f"{self.path}.lock").unlink(missing_ok=True)
        os.close(self._lock_fd)


class SpoolingProducer(LogProducer):
    def __init__(self, settings: Settings, spool_dir: Path, adopt_orphans: bool = True):
        self._own = Spool.create(spool_dir)
        self._kafka = _producer_or_none(settings, self._own.path)
        self._principal = settings.kafka_sasl_username or "this client"
        orphans = Spool.orphans(spool_dir) if adopt_orphans else []
        self.adopted = len(orphans)
        self._sources = [*orphans, self._own]
        for spool in self._sources:
            spool.on_delivery = self._report_for(spool)
        self._buffer: list[tuple[str, bytes, bytes]] = []
        self._buffer_lock = threading.Lock()
        self._sources_lock = threading.Lock()
        self._stop = threading.Event()
        self._spooled = threading.Event()  # rows written: wakes an idle forwarder
        self.sent = 0
        self.rejected = 0
        self._forwarder = threading.Thread(target=self._forward_loop, name="trainwire-forwarder", daemon=True)
        if self._kafka is not None:
            self._forwarder.start()

    def append(self, topic: str, key: bytes, value: bytes) -> None:
        with self._buffer_lock:
            self._buffer.append((topic, key, value))

    def _spool_buffer(self) -> None:
        with self._buffer_lock:
            rows, self._buffer = self._buffer, []
            if rows:
                self._own.write(rows)
                self._spooled.set()

    def undelivered(self) -> int:
        with self._sources_lock:
            return len(self._buffer) + sum(s.undelivered() for s in self._sources)

    def flush(self, timeout: float) -> int:
        """Spool what is buffered (durable); then wait up to `timeout` for the broker. Returns undelivered."""
        self._spool_buffer()
        if self._kafka is None:
            return self.undelivered()  # no producer: nothing leaves the spool in this process
        deadline = time.monotonic() + timeout
        remaining = self.undelivered()
        while remaining and time.monotonic() < deadline:
            time.sleep(0.02)
            remaining = self.undelivered()
        return remaining

    def _forward_loop(self) -> None:
        last_cleanup = time.monotonic()
        while not self._stop.is_set():
            self._spooled.clear()  # before looking: rows spooled from here on end the idle wait below
            sent = 0
            with self._sources_lock:
                for spool in self._sources:
                    sent += self._forward(spool)
                in_flight = any(spool.outstanding for spool in self._sources)
            if sent:
                self._kafka.poll(0)
            elif in_flight:
                self._kafka.poll(0.1)  # returns at the first delivery report
            else:  # nothing to send or to hear back: wake when rows are spooled, not 50 times a second
                self._kafka.poll(0)
                self._spooled.wait(IDLE_SECONDS)
            if time.monotonic() - last_cleanup > 0.5:
                last_cleanup = time.monotonic()
                self._cleanup()

    def _forward(self, spool: Spool) -> int:
        room = MAX_IN_FLIGHT - len(spool.outstanding)
        rows = spool.read(min(READ_BATCH, room)) if room > 0 else []
        slice_started = time.perf_counter()
        for row in rows:
            row_id, topic, key, value = row
            spool.outstanding.append(row_id)
            if value in spool.in_flight:  # the same bytes twice in flight (never from the SDK): a report of its own
                on_delivery = lambda err, msg, s=spool, r=row: self._delivered(s, r, err)  # noqa: E731
            else:
                spool.in_flight[value] = row_id
                on_delivery = spool.on_delivery
            while True:
                try:
                    self._kafka.produce(topic, value=value, key=key, on_delivery=on_delivery)
                    break
                except BufferError:
                    self._kafka.poll(0.05)
            if time.perf_counter() - slice_started >= SLICE_SECONDS:
                time.sleep(YIELD_SECONDS)
                slice_started = time.perf_counter()
        return len(rows)

    def _report_for(self, spool: Spool) -> Callable[[KafkaError | None, Message], None]:
        """The delivery report callback shared by a spool's messages in flight."""
        def delivered(err: KafkaError | None, msg: Message) -> None:
            value = msg.value()
            row_id = spool.in_flight.pop(value)
            self._delivered(spool, (row_id, msg.topic(), msg.key(), value), err)

        return delivered

    def _delivered(self, spool: Spool, row: tuple, err: KafkaError | None) -> None:
        if err is None:
            self.sent += 1
        elif err.code() in (KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT) or err.fatal():
            if err.fatal() and not self._stop.is_set():
                log.error("kafka producer failed for good (%s); events stay spooled in %s", err, spool.path)
                self._stop.set()
            return  # not sent: the row stays in the spool for the next start or `trainwire spool replay`
        elif err.code() in _NOT_ALLOWED:  # an ACL: a grant may come, so the row stays spooled, said once a minute
            librdkafka_log.error("kafka producer: %s may not write to %s (%s): grant it WRITE, or check "
                                 "TRAINWIRE_KAFKA_SASL_USERNAME; events stay spooled in %s", self._principal, row[1],
                                 err.str(), spool.path.parent)
            return
        else:
            # with no message timeout only errors about this message come back (e.g. too large): keep it aside
            self.rejected += 1
            log.error("kafka refused a spooled message (%s); kept in table rejected of %s", err, spool.path)
            spool.reject(row, str(err))
        spool.mark_delivered(row[0])

    def _cleanup(self) -> None:
        with self._sources_lock:
            for spool in self._sources:
                spool.delete_acked()
            done = [s for s in self._sources if s is not self._own and s.undelivered() == 0]
            for spool in done:
                spool.close(remove_if_empty=True)
                self._sources.remove(spool)

    def close(self) -> None:
        """Stop at once; whatever the broker has not acknowledged stays in the spool file."""
        undelivered = self.flush(0)
        self._stop.set()
        self._spooled.set()
        if self._kafka is not None:
            self._forwarder.join(timeout=5)
            self._kafka.purge()  # what is left is still in the spool file, for the next start
            self._kafka.poll(0)
        with self._sources_lock:
            for spool in self._sources:
                spool.close(remove_if_empty=True)
            self._sources.clear()
        if undelivered:
            log.warning("trainwire: %d events not yet delivered to Kafka stay spooled in %s", undelivered,
                        self._own.path.parent)


def _producer_or_none(settings: Settings, spool: Path) -> Producer | None:
    """The forwarder's producer; None, with one error line, when librdkafka refuses the settings (say a CA file
    that is no certificate): training goes on, its events wait in the spool for `trainwire spool replay`."""
    try:
        return Producer(producer_config(settings) | {"message.timeout.ms": 0})  # never give up: the spool holds it
    except KafkaException as err:
        log.error("trainwire: no Kafka producer (%s); events stay spooled in %s", describe_config_error(err), spool)
        return None
