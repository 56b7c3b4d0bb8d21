"""Gate evaluation at run end, on a thread of its own: ingest hands over the run id and goes on.

An evaluation takes tens of milliseconds of queries; a thousand runs ending together must not stall ingest for
a minute. Runs whose run ended is stored but that have no run-end evaluation (the consumer stopped first, or an
evaluation failed) are evaluated when the next consumer starts.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from trainwire.infra.config import Settings
from trainwire.infra.store import connect_store

from .registry import SYSTEM_ACTOR
from .service import Governance, roles_for

log = logging.getLogger(__name__)
_STOP = object()


class GateWorker:
    """The ingest pipeline's run-end hook: `worker(run_id)` queues, `close()` finishes what is queued."""

    def __init__(self, settings: Settings, close_timeout: float = 30.0):
        self._settings = settings
        self._close_timeout = close_timeout
        self._queue: queue.Queue = queue.Queue()
        self._deadline: float | None = None
        self._roles = roles_for(settings)  # a bad roles file stops the consumer at start, not the thread later
        self._thread = threading.Thread(target=self._work, name="gate-worker", daemon=True)
        self.evaluated = 0

    def start(self) -> GateWorker:
        self._thread.start()
        return self

    def __call__(self, run_id: str) -> None:
        self._queue.put(run_id)

    def close(self) -> None:
        """Evaluate what is queued (up to `close_timeout`); what is left waits for the next consumer's start."""
        self._deadline = time.monotonic() + self._close_timeout
        self._queue.put(_STOP)
        self._thread.join()

    def _work(self) -> None:
        try:
            client = connect_store(self._settings.store_dsn)
        except Exception:
            log.exception("gates: cannot reach the store; runs that end are evaluated when a consumer starts")
            return
        try:
            governance = Governance(client, self._roles)
            for run_id in governance.reader.runs_awaiting_gates():
                self._queue.put(run_id)
            while (run_id := self._queue.get()) is not _STOP:
                if self._deadline is not None and time.monotonic() > self._deadline:
                    log.warning("gates: stopping with runs not yet evaluated; the next consumer evaluates them")
                    break
                self._evaluate(governance, run_id)
        finally:
            client.close()  # chdb serves one data directory per process: let go of it

    def _evaluate(self, governance: Governance, run_id: str) -> None:
        try:
            if governance.reader.evaluated_at_run_end(run_id):
                return  # a redelivered run ended
            result = governance.evaluate_gates(run_id, SYSTEM_ACTOR, trigger="run_end")
            self.evaluated += 1
            log.info("gates of run %s: %s (stage %s)", run_id, result["overall"], result["stage"])
        except Exception:
            log.exception("gates: evaluating run %s failed; `trainwire gates %s` evaluates it on demand",
                          run_id, run_id)
