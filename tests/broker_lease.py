"""Who stops the plain broker the tests share (infra/kafka/up on TRAINWIRE_KAFKA_PORT): every test session holds a
lease on it while it runs, and the last one out stops it if a test session started it, even when that session ended
first. A broker that was running before (the user's own) is never stopped. The lease is a shared flock on a file
beside the broker's pid file; a second file names the pid of the broker that tests started."""

from __future__ import annotations

import fcntl
import os
import subprocess
from pathlib import Path


class BrokerLease:
    def __init__(self, cache: Path, port: int, down: Path):
        self._port, self._down, self._cache = port, down, cache
        self._lease = cache / f"broker-{port}.sessions"
        self._started_by_tests = cache / f"broker-{port}.started-by-tests"
        self._file = None

    def take(self) -> None:
        """Held until `release`; waits while the last session out is stopping the broker."""
        self._cache.mkdir(parents=True, exist_ok=True)
        self._file = open(self._lease, "a")  # noqa: SIM115 (held for the whole session)
        fcntl.flock(self._file, fcntl.LOCK_SH)

    def started_it(self) -> None:
        self._started_by_tests.write_text(self._broker_pid())

    def release(self) -> str | None:
        """Ends this session's lease; says what became of a broker that tests started, else None."""
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            if self._tests_started_it():
                return (f"the Kafka broker the tests started on 127.0.0.1:{self._port} is left running for another "
                        "test session, which stops it as it ends")
            return None
        try:
            if not self._tests_started_it():
                self._started_by_tests.unlink(missing_ok=True)  # for a broker stopped since, by hand
                return None
            subprocess.run([str(self._down)], capture_output=True, timeout=120,
                           env={**os.environ, "TRAINWIRE_KAFKA_CACHE": str(self._cache),
                                "TRAINWIRE_KAFKA_PORT": str(self._port)})
            self._started_by_tests.unlink()
            return f"stopped the Kafka broker the tests started on 127.0.0.1:{self._port}"
        finally:
            self._file.close()

    def _tests_started_it(self) -> bool:
        """The broker running now is the one tests started (not one the user started since, on the same port)."""
        pid = self._broker_pid()
        return bool(pid) and self._started_by_tests.exists() and self._started_by_tests.read_text() == pid

    def _broker_pid(self) -> str:
        pid_file = self._cache / f"broker-{self._port}.pid"
        return pid_file.read_text().strip() if pid_file.exists() else ""
