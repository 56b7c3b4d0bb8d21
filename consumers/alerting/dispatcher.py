"""One worker thread per sink delivers that sink's pages from the outbox, so a sink that is slow or down delays only
its own pages. A retryable failure backs off exponentially (with jitter) up to a cap; a page still undelivered after
`give_up_after_seconds`, or refused outright by its endpoint, is marked failed and logged."""

from __future__ import annotations

import logging
import random
import threading
import time

from trainwire.infra.alerting_settings import AlertingSettings

from .outbox import Delivery, Outbox
from .sinks import Sink, SinkError

log = logging.getLogger(__name__)
IDLE_CHECK_SECONDS = 1.0  # how often an idle worker looks for pages another process left due


class SinkWorker:
    def __init__(self, sink: Sink, outbox: Outbox, settings: AlertingSettings, lease_seconds: float,
                 on_delivered=None):
        self.sink = sink
        self._outbox = outbox
        self._settings = settings
        self._lease = lease_seconds
        self._on_delivered = on_delivered
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sink-{sink.name}", daemon=True)
        self.delivered = self.retried = self.failed = 0

    def start(self) -> SinkWorker:
        self._thread.start()
        return self

    def stop(self, timeout: float) -> None:
        self._stop.set()
        self.wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.wake.clear()
            try:
                for delivery in self._outbox.claim(self.sink.name, self._lease):
                    if self._stop.is_set():
                        break  # its lease runs out and it is delivered next time
                    self._deliver(delivery)
                due = self._outbox.next_due(self.sink.name)
            except Exception:  # the outbox itself (disk full, locked too long): keep trying
                log.exception("alerting: sink %s cannot read its outbox", self.sink.name)
                due = None
            wait = IDLE_CHECK_SECONDS if due is None else min(IDLE_CHECK_SECONDS, max(0.0, due - time.time()))
            if wait > 0:
                self.wake.wait(wait)

    def _deliver(self, delivery: Delivery) -> None:
        try:
            self.sink.deliver(delivery.alert)
        except Exception as err:  # a sink's bug must not stop its worker: treat it as a retryable failure
            self._failed(delivery, err)
            return
        self._outbox.delivered(delivery)
        self.delivered += 1
        if self._on_delivered is not None:
            self._on_delivered(self.sink.name, delivery.alert)

    def _failed(self, delivery: Delivery, err: Exception) -> None:
        error = str(err) if isinstance(err, SinkError) else f"{type(err).__name__}: {err}"
        retryable = getattr(err, "retryable", True)
        waited = time.time() - delivery.enqueued_at
        if not retryable or waited >= self._settings.give_up_after_seconds:
            self._outbox.failed(delivery, error)
            self.failed += 1
            log.error("alerting: %s gave up on %s (%s) after %d attempts: %s", self.sink.name,
                      delivery.alert.dedup_key, delivery.alert.state, delivery.attempts + 1, error)
            return
        backoff = min(self._settings.retry_max_seconds,
                      self._settings.retry_initial_seconds * 2 ** min(delivery.attempts, 30))
        backoff *= random.uniform(0.8, 1.2)  # many pages failing together do not retry in lock-step
        self._outbox.retry_at(delivery, time.time() + backoff, error)
        self.retried += 1
        log.warning("alerting: %s will retry %s (%s) in %.1fs: %s", self.sink.name, delivery.alert.dedup_key,
                    delivery.alert.state, backoff, error)


class Dispatcher:
    def __init__(self, sinks: list[Sink], outbox: Outbox, settings: AlertingSettings, on_delivered=None):
        timeout = max((getattr(getattr(s, "settings", None), "timeout_seconds", 5.0) for s in sinks), default=5.0)
        # A lease outlives a claimed batch's deliveries, so another process does not send them at the same time.
        lease = 20 * timeout + 10
        self.workers = {sink.name: SinkWorker(sink, outbox, settings, lease, on_delivered) for sink in sinks}

    def start(self) -> Dispatcher:
        for worker in self.workers.values():
            worker.start()
        return self

    def wake(self, sink_names) -> None:
        for name in sink_names:
            self.workers[name].wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        for worker in self.workers.values():
            worker.stop(timeout)

    def counts(self) -> dict[str, dict[str, int]]:
        return {name: {"delivered": w.delivered, "retried": w.retried, "failed": w.failed}
                for name, w in self.workers.items()}
