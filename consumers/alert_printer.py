"""`trainwire consume` prints every alert it raises; from a thread of its own, so that a storm of alerts never holds
the ingest loop on a slow terminal or pipe."""

from __future__ import annotations

import queue
import sys
import threading
from typing import TextIO

from trainwire.schemas import Alert

_STOP = None


def alert_line(alert: Alert) -> str:
    return (f"ALERT {alert.state:<8} {alert.severity:<8} {alert.rule:<16} run={alert.run_id} step={alert.step} "
            f"{alert.message}")


class AlertPrinter:
    """`printer(alert)` queues its line and returns; beyond `max_queued` waiting lines, lines are counted instead
    and the count is printed once the printer catches up. `close()` prints what is queued."""

    def __init__(self, stream: TextIO | None = None, max_queued: int = 10_000):
        self._stream = stream or sys.stderr
        self._queue: queue.Queue[str | None] = queue.Queue(max_queued)
        self._unprinted = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._print, name="alert-printer", daemon=True)
        self._thread.start()

    def __call__(self, alert: Alert) -> None:
        try:
            self._queue.put_nowait(alert_line(alert))
        except queue.Full:
            with self._lock:
                self._unprinted += 1

    def _print(self) -> None:
        while (line := self._queue.get()) is not _STOP:
            print(line, file=self._stream, flush=self._queue.empty())
            with self._lock:
                unprinted, self._unprinted = self._unprinted, 0
            if unprinted:
                print(f"ALERT … {unprinted} more alert lines not printed (the terminal could not keep up); every "
                      "alert is stored and published", file=self._stream, flush=True)

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout=10)
