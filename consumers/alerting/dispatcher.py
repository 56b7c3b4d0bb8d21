"""One worker thread per sink delivers that sink's pages from the outbox, so a sink that is slow or down delays only
its own pages. A retryable failure backs off exponentially (with jitter) up to a cap; a page still undelivered after
`give_up_after_seconds`, or refused outright by its endpoint, is marked failed and logged.

A worker claims one page at a time, the one it is about to send, so a process that dies holds at most one page per
sink, and a successor takes it over at once (see outbox.py).

A sink's `rate_limit_per_minute` caps the firing pages it sends in any 60 s: a page over the limit is not dropped
but moved into the sink's summary page, sent as soon as the minute allows, listing everything held back."""

from __future__ import annotations

import logging
import random
import threading
import time

from trainwire.infra.alerting_settings import AlertingSettings
from trainwire.infra.redact import redact_text

from . import holders
from .outbox import Delivery, Outbox
from .sinks import Sink, SinkError

log = logging.getLogger(__name__)
IDLE_CHECK_SECONDS = 1.0  # how often an idle worker looks for pages another process left due


class SinkWorker:
    def __init__(self, sink: Sink, outbox: Outbox, settings: AlertingSettings, on_delivered=None):
        self.sink = sink
        self._outbox = outbox
        self._settings = settings
        self._on_delivered = on_delivered
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._unrecorded: set[tuple[str, str]] = set()  # delivered, but the outbox could not record it then
        self._thread = threading.Thread(target=self._run, name=f"sink-{sink.name}", daemon=True)
        self.delivered = self.retried = self.failed = self.held_back = 0

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
                while not self._stop.is_set() and (delivery := self._outbox.claim(self.sink.name)):
                    self._deliver(delivery)
                due = self._outbox.next_due(self.sink.name)
            except Exception:  # the outbox itself (disk full, locked too long): keep trying
                log.exception("alerting: sink %s cannot read its outbox", self.sink.name)
                due = None
            wait = IDLE_CHECK_SECONDS if due is None else min(IDLE_CHECK_SECONDS, max(0.0, due - time.time()))
            if wait > 0:
                self.wake.wait(wait)

    def _deliver(self, delivery: Delivery) -> None:
        page = (delivery.alert.dedup_key, delivery.alert.state)
        if page in self._unrecorded:  # it went out: record that now instead of sending it again
            self._outbox.delivered(delivery)
            self._unrecorded.discard(page)
            return
        if self._held_back(delivery):
            return
        if delivery.unsettled_attempt_by:
            log.warning("alerting: %s sends %s (%s) again: %s was sending it and stopped before it knew the "
                        "outcome, so it may have reached the receiver already (which can de-duplicate it by its "
                        "key)", self.sink.name, delivery.alert.dedup_key, delivery.alert.state,
                        holders.describe(delivery.unsettled_attempt_by))
        try:
            if delivery.members:
                self.sink.deliver_bundle(delivery)
            else:
                self.sink.deliver(delivery.alert)
        except Exception as err:  # a sink's bug must not stop its worker: treat it as a retryable failure
            self._failed(delivery, err)
            return
        self.delivered += 1
        try:
            self._outbox.delivered(delivery)
        except Exception:
            self._unrecorded.add(page)
            raise
        if self._on_delivered is not None:
            self._on_delivered(self.sink.name, delivery.alert)

    def _held_back(self, delivery: Delivery) -> bool:
        """Whether the sink's rate limit holds this firing page back (into its summary page, sent later)."""
        limit = getattr(getattr(self.sink, "settings", None), "rate_limit_per_minute", 0)
        if not limit or delivery.alert.state != "firing" or delivery.unsettled_attempt_by:
            return False
        until = self._outbox.rate_limited_until(self.sink.name, limit)
        if until is None:
            return False
        summary = self._outbox.hold_back(delivery, until)
        self.held_back += 1
        log.warning("alerting: %s sent %d pages in the last minute (its limit): %s is held back into %s, sent in "
                    "%.0fs", self.sink.name, limit, delivery.alert.dedup_key, summary, max(0.0, until - time.time()))
        return True

    def _failed(self, delivery: Delivery, err: Exception) -> None:
        error = str(err) if isinstance(err, SinkError) else f"{type(err).__name__}: {err}"
        error = getattr(self.sink, "redact", redact_text)(error)  # a sink's bug may quote its URL or key
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
        self.workers = {sink.name: SinkWorker(sink, outbox, settings, on_delivered) for sink in sinks}

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
