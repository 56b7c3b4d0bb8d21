"""The embedded transport: an append-only log in one SQLite file, shared by every process on the machine.

One partition per topic; the offset is the row id, which SQLite assigns in commit order because it runs
one write transaction at a time, so a reader never sees offset N+1 before offset N.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from .base import LogConsumer, LogProducer, LogTail, Record, TopicPartition, TransportError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    offset INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    key BLOB,
    value BLOB NOT NULL,
    ts_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS records_by_topic ON records (topic, offset);
CREATE TABLE IF NOT EXISTS commits (
    grp TEXT NOT NULL,
    topic TEXT NOT NULL,
    next_offset INTEGER NOT NULL,
    PRIMARY KEY (grp, topic)
);
"""
_POLL_INTERVAL = 0.02


def connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    use_wal(conn)
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(_SCHEMA)
    return conn


def use_wal(conn: sqlite3.Connection, timeout: float = 30.0) -> None:
    # Switching to WAL needs an exclusive lock and SQLite's busy timeout does not cover it, so a process
    # opening the log while another holds it open can get "database is locked"; WAL persists in the file,
    # so once any process has switched, the rest only need to see that it is already on.
    deadline = time.monotonic() + timeout
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
                return
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class SqliteLogProducer(LogProducer):
    def __init__(self, path: Path):
        self._conn = connect(path)
        self._pending: list[tuple[str, bytes, bytes, int]] = []
        self._lock = threading.Lock()

    def append(self, topic: str, key: bytes, value: bytes) -> None:
        with self._lock:
            self._pending.append((topic, key, value, time.time_ns() // 1_000_000))

    def flush(self, timeout: float) -> int:
        with self._lock:
            pending, self._pending = self._pending, []
            if not pending:
                return 0
            try:
                with self._conn:
                    self._conn.execute("BEGIN IMMEDIATE")
                    self._conn.executemany(
                        "INSERT INTO records (topic, key, value, ts_ms) VALUES (?, ?, ?, ?)", pending
                    )
            except sqlite3.Error as err:
                self._pending = pending + self._pending
                raise TransportError(f"local log write failed: {err}") from err
            return 0

    def close(self) -> None:
        self.flush(0)
        self._conn.close()


class SqliteLogConsumer(LogConsumer):
    def __init__(self, path: Path, group: str, topics: list[str]):
        self._conn = connect(path)
        self._group = group
        self._topics = list(topics)
        self.rewind()

    def rewind(self) -> None:
        committed = dict(
            self._conn.execute(
                f"SELECT topic, next_offset FROM commits WHERE grp = ? AND topic IN ({','.join('?' * len(self._topics))})",
                [self._group, *self._topics],
            ).fetchall()
        )
        self._position = {topic: committed.get(topic, 0) for topic in self._topics}

    def poll(self, max_records: int, timeout: float) -> list[Record]:
        if self._paused:
            time.sleep(timeout)
            return []
        deadline = time.monotonic() + timeout
        while True:
            records = self._read(max_records)
            if records or time.monotonic() >= deadline:
                return records
            time.sleep(_POLL_INTERVAL)

    def _read(self, max_records: int) -> list[Record]:
        out: list[Record] = []
        for topic in self._topics:
            budget = max_records - len(out)
            if budget <= 0:
                break
            rows = self._conn.execute(
                "SELECT offset, key, value, ts_ms FROM records WHERE topic = ? AND offset >= ? ORDER BY offset LIMIT ?",
                (topic, self._position[topic], budget),
            ).fetchall()
            if rows:
                self._position[topic] = rows[-1][0] + 1
                out.extend(Record(topic, 0, offset, key, value, ts) for offset, key, value, ts in rows)
        return out

    def commit(self, positions: Mapping[TopicPartition, int]) -> None:
        rows = [(self._group, topic, offset) for (topic, _partition), offset in positions.items()]
        with self._conn:
            self._conn.executemany(
                "INSERT INTO commits (grp, topic, next_offset) VALUES (?, ?, ?) "
                "ON CONFLICT (grp, topic) DO UPDATE SET next_offset = max(next_offset, excluded.next_offset)",
                rows,
            )

    def assigned(self) -> bool:
        return True  # every member of a group reads every topic's one partition from the moment it subscribes

    def pending(self, fresh: bool = True) -> dict[tuple[str, int], int]:
        return {(topic, 0): self._conn.execute("SELECT count(*) FROM records WHERE topic = ? AND offset >= ?",
                                               (topic, self._position[topic])).fetchone()[0]
                for topic in self._topics}

    def behind(self) -> set[tuple[str, int]]:
        # asked every second: whether a record is waiting, without counting a backlog of millions
        return {(topic, 0) for topic in self._topics if self._conn.execute(
            "SELECT 1 FROM records WHERE topic = ? AND offset >= ? LIMIT 1", (topic, self._position[topic])).fetchone()}

    def close(self) -> None:
        self._conn.close()


class SqliteLogTail(LogTail):
    """One topic of the local log from `since_ms` on (the append time, one clock: the machine's)."""

    def __init__(self, path: Path, topic: str, since_ms: int, poll_interval: float = 0.2):
        self._conn = connect(path)
        self._topic = topic
        self._since_ms = since_ms
        self._poll_interval = poll_interval
        # a row's time is its append time, taken before the commit that gives its offset: times are not in offset
        # order, so start at the first row at or after since_ms and keep filtering by time
        (self._position,) = self._conn.execute(
            "SELECT coalesce(min(offset), (SELECT coalesce(max(offset), 0) + 1 FROM records)) FROM records "
            "WHERE topic = ? AND ts_ms >= ?", (topic, since_ms)).fetchone()

    def poll(self, max_records: int, timeout: float) -> list[Record]:
        deadline = time.monotonic() + timeout
        while True:
            rows = self._conn.execute(
                "SELECT offset, key, value, ts_ms FROM records WHERE topic = ? AND offset >= ? ORDER BY offset "
                "LIMIT ?", (self._topic, self._position, max_records)).fetchall()
            if rows:
                self._position = rows[-1][0] + 1
                records = [Record(self._topic, 0, o, k, v, ts) for o, k, v, ts in rows if ts >= self._since_ms]
                if records:
                    return records
                continue
            if time.monotonic() >= deadline:
                return []
            time.sleep(self._poll_interval)

    def close(self) -> None:
        self._conn.close()
