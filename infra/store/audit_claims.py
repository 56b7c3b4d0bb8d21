"""One appender per sequence number: a lock for the threads of a process and the processes of a home, and a claim
in the store for processes on different hosts appending to one ClickHouse server.

Claim: insert (seq, claimant) into `audit_claims`, whose `claimed_at` is the server's clock at insertion; read the
claims for that seq back, oldest first (ties by claimant). The first claimant appends; the others wait for its
entry and take the next seq. A claim younger than CLAIM_SETTLE_SECONDS is not read back yet: an older claim may
still be in flight, timestamped but not yet visible. A claim older than CLAIM_STALE_SECONDS whose entry never came
(its process died) no longer counts.
"""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

from clickhouse_connect.driver.client import Client

CLAIM_SETTLE_SECONDS = 0.1
CLAIM_STALE_SECONDS = 30.0


class AppendLock:
    """Re-entrant within a thread, so an operation that appends holds it across its own reads and writes. The
    outermost holder also holds, until it lets go, an exclusive `flock` on the lock file of each home it appended
    for: processes sharing a home (`consume`, `dashboard`, the CLI) take turns."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._depth = 0
        self._files: dict[str, int] = {}

    def __enter__(self) -> "AppendLock":
        self._lock.acquire()
        self._depth += 1
        return self

    def __exit__(self, *_exc: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            for descriptor in self._files.values():
                fcntl.flock(descriptor, fcntl.LOCK_UN)
                os.close(descriptor)
            self._files.clear()
        self._lock.release()

    def hold_file(self, path: Path) -> None:
        """Take the file lock (blocking) for the rest of the outermost hold; call inside `with lock:`."""
        if self._depth == 0:
            raise RuntimeError("AppendLock.hold_file outside `with lock:`")
        if str(path) in self._files:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        self._files[str(path)] = descriptor


def claim(client: Client, seq: int, claimant: str, wait=None) -> bool:
    """Claim `seq`; True when this claimant is the first live one (and so may append it)."""
    import time

    wait = wait or time.sleep
    client.insert("audit_claims", [[seq, claimant]], column_names=["seq", "claimant"])
    while True:
        rows = client.query(
            "SELECT claimant, dateDiff('microsecond', claimed_at, now64(9)) / 1e6 AS age FROM audit_claims "
            "WHERE seq = {seq:UInt64} ORDER BY claimed_at, claimant", parameters={"seq": seq}).result_rows
        mine = min((age for who, age in rows if who == claimant), default=0.0)
        if mine >= CLAIM_SETTLE_SECONDS:
            live = [who for who, age in rows if who == claimant or age < CLAIM_STALE_SECONDS]
            return live[0] == claimant
        wait(CLAIM_SETTLE_SECONDS - mine)
