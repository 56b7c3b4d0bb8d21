"""One appender at a time: a lock for the threads of a process and, through `flock` on the home's lock file, for
the processes sharing a home. Appenders on different hosts are kept apart by the store itself: it takes one entry
per sequence number (audit_chain.py).
"""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path


class AppendLock:
    """Re-entrant within a thread, so an operation that appends holds it across its own reads and writes. The
    outermost holder also holds, until it lets go, an exclusive `flock` on the lock file of each home it appended
    for, and from the start on `home_file` (this process's configured home): processes sharing a home (`consume`,
    `dashboard`, the CLI) take turns, a registry transition's checks and entry included."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._depth = 0
        self._files: dict[str, int] = {}
        self.home_file: Path | None = None

    def __enter__(self) -> "AppendLock":
        self._lock.acquire()
        self._depth += 1
        if self._depth == 1 and self.home_file is not None:
            try:
                self.hold_file(self.home_file)
            except BaseException:
                self.__exit__()
                raise
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


# The process's lock: every append and every operation that must see no append of others between its reads and its
# entry (a registry transition) holds it.
append_lock = AppendLock()
