"""The ingest loop, composed of its steps: poll → decode, check and detect (decoding.py) → store in a worker thread
(storing.py) → publish alerts and dead letters → commit.

One batch is built while the one before it is stored; offsets are committed in order, each only after its batch is
stored (at-least-once), and event ids and ReplacingMergeTree turn redeliveries into one stored row. While a full
batch waits for the insert before it, the partitions are paused: the poll thread keeps the group membership and the
clock-driven detectors alive instead of sleeping. A record that cannot become a valid event, that its topic does
not carry, or that ClickHouse refuses goes to `dead_letters` with its reason and the loop goes on; only an
unavailable dependency (broker, store, schema registry) makes it drop what it holds and read it again.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

from trainwire.infra.config import Settings
from trainwire.infra.log import LogConsumer, LogProducer, Record, TransportError
from trainwire.infra.log.base import FatalTransportError, next_positions
from trainwire.infra.log.topics import ALERTS, CONSUMER_TOPICS, DEAD_LETTERS, dead_letter_message, topic_for
from trainwire.schemas import EVENT_TYPES, Alert, Codec, CodecUnavailableError, SingleObjectCodec

from .alert_printer import alert_line
from .admission import Admission, DeadLetterBudget
from .avro_parser import AvroParser
from .batch import Batch
from .decoding import ColumnarDecoding, DetectorErrors, RecordDecoding
from .detectors import DetectorEngine, HistoryUnavailableError
from .frames import FrameDecoder
from .metrics import IngestMetrics
from .storing import BatchStore, Stored
from .writer import ClickHouseWriter, StoreWriteError

log = logging.getLogger(__name__)
RETRYABLE = (TransportError, StoreWriteError, CodecUnavailableError, HistoryUnavailableError)
MAX_BACKOFF_SECONDS = 30.0
TICK_SECONDS = 1.0  # how often time-based detectors (run_stalled) are judged


@dataclass
class IngestStats:
    consumed: int = 0
    stored: int = 0
    dead_lettered: int = 0
    alerts: int = 0
    redeliveries_skipped: int = 0
    batches: int = 0
    retries: int = 0
    detector_errors: int = 0


class RunEndHook(Protocol):
    """Told each run whose run ended event is stored (e.g. the quality gates); closed with the pipeline."""

    def __call__(self, run_id: str) -> None: ...

    def close(self) -> None: ...


def print_alert(alert: Alert) -> None:
    print(alert_line(alert), file=sys.stderr, flush=True)


class IngestPipeline:
    def __init__(self, consumer: LogConsumer, writer: ClickHouseWriter, alert_producer: LogProducer | None,
                 settings: Settings, detectors: DetectorEngine | None = None, on_alert=print_alert,
                 codec: Codec | None = None, metrics: IngestMetrics | None = None,
                 on_run_ended: RunEndHook | None = None):
        self._consumer = consumer
        self._consumer.on_revoke = self._on_revoke
        self.metrics = metrics or IngestMetrics()
        self._lag_checked = 0.0
        self._codec = codec or SingleObjectCodec()
        self._writer = writer
        self._alert_producer = alert_producer
        self._settings = settings
        self._detectors = detectors or DetectorEngine(settings.detectors)
        self._ticked = 0.0
        self._on_alert = on_alert
        self._on_run_ended = on_run_ended
        self._batch = Batch()
        self._in_flight: tuple[Batch, Future[Stored]] | None = None  # the batch being stored, and its result
        self._store = BatchStore(writer)
        self._backoff = 0.0
        self._must_rewind = False
        self._dead_letter_budget = DeadLetterBudget(settings.dead_letter_max_consecutive,
                                                    settings.dead_letter_max_ratio)
        self._detector_errors = DetectorErrors()
        self._parser: AvroParser | None = None
        self._decoding = self._decoding_for(settings)
        self.last_stored = time.monotonic()  # when a batch was last stored and committed (or the start)
        self.stats = IngestStats()

    def _decoding_for(self, settings: Settings) -> ColumnarDecoding | RecordDecoding:
        if settings.ingest_path == "records":
            return RecordDecoding(self._codec, Admission(settings), self._dead_letter_budget, self._detectors,
                                  self._dead_letter, self._detector_errors)
        self._parser = AvroParser(settings.store_dsn)
        decoder = FrameDecoder(self._codec, settings, self._parser)
        return ColumnarDecoding(decoder, self._dead_letter_budget, self._detectors, self._dead_letter,
                                self._detector_errors)

    def run_once(self, poll_timeout: float = 0.2, force_flush: bool = False) -> int:
        """Poll once, process what came, hand the batch to the insert if it is full or old. Returns records polled.

        When a dependency is briefly unavailable (store, transport, schema registry) the uncommitted batches are
        dropped and the consumer rewinds to its last commit after a back-off: nothing lost, nothing skipped.
        """
        records: list[Record] = []
        try:
            if self._must_rewind:
                self._consumer.rewind()
                self._must_rewind = False
            self._collect(wait=False)
            room = self._settings.batch_max_rows - len(self._batch.records)
            if room <= 0:  # full, and the insert before it is still running: wait for it without reading more
                self._consumer.pause()
                records = self._consumer.poll(1, poll_timeout)
            else:
                if self._consumer.paused:
                    self._consumer.resume()
                records = self._consumer.poll(room, poll_timeout)
            if records:
                if not self._batch:
                    self._batch.started = time.monotonic()
                self._decoding.add(records, self._batch)
            if time.monotonic() - self._ticked >= TICK_SECONDS:
                self._tick()
            batch = self._batch
            if batch and (force_flush or batch.urgent or len(batch.records) >= self._settings.batch_max_rows
                          or time.monotonic() - batch.started >= self._settings.batch_max_seconds):
                self._hand_over(wait=force_flush or batch.urgent)
            elif force_flush:
                self._collect(wait=True)
        except FatalTransportError:  # e.g. fenced by a member with the same instance id: retrying cannot help
            raise
        except RETRYABLE as err:
            self._retry_after(err)
            return 0
        if time.monotonic() - self._lag_checked > 1.0:
            self._lag_checked = time.monotonic()
            self._update_gauges()
        return len(records)

    def flush(self) -> None:
        """Store, publish and commit everything held, now."""
        if self._batch:
            self._hand_over(wait=True)
        else:
            self._collect(wait=True)

    def _hand_over(self, wait: bool) -> None:
        """Give the batch being built to the insert step, once the one before it is stored (commits stay in
        order); with `wait`, until it is stored, published and committed too."""
        if self._in_flight is not None and not wait and not self._in_flight[1].done():
            return  # back-pressure: the next run_once pauses the partitions if the batch fills meanwhile
        self._collect(wait=True)
        batch, self._batch = self._batch, Batch()
        if batch.dead_letters:  # before anything is stored: a tripped limit leaves the whole batch to be read again
            self._dead_letter_budget.judge(len(batch.records), len(batch.dead_letters), batch.dead_letters[-1][3])
        self._in_flight = (batch, self._store.submit(batch))
        if wait:
            self._collect(wait=True)

    def _collect(self, wait: bool) -> None:
        """Publish and commit the batch in flight once it is stored (at once if `wait`)."""
        if self._in_flight is None or not (wait or self._in_flight[1].done()):
            return
        batch, future = self._in_flight
        self._in_flight = None
        self._finish(batch, future.result())  # raises what the insert raised

    def _finish(self, batch: Batch, stored: Stored) -> None:
        for record, reason in stored.refused:
            if record is None:  # an alert row: made here, so a bug to report, never a record to dead-letter
                log.error("ingest: ClickHouse refused an alert row: %s", reason)
                continue
            self._dead_letter(batch, record, reason)
        self._writer.write_dead_letters(batch.dead_letters)
        self.metrics.insert_seconds.observe(stored.seconds)
        self._publish(batch)
        if batch.records:  # a batch of only run_stalled alerts has nothing to commit
            self._consumer.commit(next_positions(batch.records))
            self._dead_letter_budget.commit(len(batch.records), len(batch.dead_letters))
            self.last_stored = time.monotonic()
            self._backoff = 0.0  # progress: the next failure starts its back-off afresh
        for alert in batch.alerts:
            self._on_alert(alert)
        self._count(batch, stored)
        self._after_run_end(batch.ended_runs)

    def _count(self, batch: Batch, stored: Stored) -> None:
        self.stats.consumed += len(batch.records)
        self.stats.stored += stored.inserted
        self.stats.redeliveries_skipped += stored.redeliveries_skipped
        self.stats.dead_lettered += len(batch.dead_letters)
        self.stats.alerts += len(batch.alerts)
        self.stats.batches += 1
        self.stats.detector_errors = self._detector_errors.count + self._detectors.failures
        self.metrics.consumed.inc(len(batch.records))
        self.metrics.redeliveries_skipped.inc(stored.redeliveries_skipped)
        self.metrics.stored.inc(stored.inserted)
        self.metrics.dead_lettered.inc(len(batch.dead_letters))
        self.metrics.alerts.inc(len(batch.alerts))
        self.metrics.batch_rows.observe(len(batch.records))

    def _update_gauges(self) -> None:
        lag = self.lag(fresh=False)
        self.metrics.lag.set(float("nan") if lag is None else lag)  # NaN: unknown (nothing assigned, no answer)
        self.metrics.since_stored.set(time.monotonic() - self.last_stored)

    def _on_revoke(self, partitions: list) -> None:
        """Before partitions move to another member, store and commit what this member holds."""
        try:
            self.flush()
        except RETRYABLE as err:  # the new owner reads them again from the last commit
            log.warning("ingest: could not flush before a rebalance (%s); dropping the uncommitted batch",
                        " ".join(str(err).split())[:500])
            self._drop_held()
        self._writer.forget_stored()  # the next owner stores these runs' events from now on
        self._detectors.forget(partitions)  # their runs' state now lives with the new owner

    def _drop_held(self) -> None:
        """Forget every uncommitted batch; an insert still running is waited for (its rows are then stored, but
        uncommitted: they come again and are left out as redeliveries)."""
        if self._in_flight is not None:
            _, future = self._in_flight
            self._in_flight = None
            future.exception()  # waits; what it raised is the failure being handled, or moot
        self._batch = Batch()
        self._dead_letter_budget.rollback()

    def _tick(self) -> None:
        self._ticked = time.monotonic()
        alerts = self._detectors.tick(time.time_ns() // 1_000_000, self._consumer.behind())
        if alerts:
            self._batch.add_alerts(alerts)

    def _retry_after(self, err: Exception) -> None:
        """Drop what is uncommitted and read it again after a back-off that grows until a batch is stored."""
        self._backoff = min(MAX_BACKOFF_SECONDS, max(0.1, self._backoff * 2))
        self.stats.retries += 1
        self.metrics.retries.inc()
        reason = " ".join(str(err).split())[:500]  # one line: no traceback, no multi-line server stack
        log.warning("ingest: %s: %s; re-reading from the last commit in %.1fs", type(err).__name__, reason,
                    self._backoff)
        self._drop_held()
        self._detectors.forget_all()  # it saw the dropped records; from storage it rebuilds what was stored
        time.sleep(self._backoff)
        self._must_rewind = True  # done at the next poll, where a failure to rewind is retried like any other

    def _dead_letter(self, batch: Batch, record: Record, reason: str) -> None:
        reason = " ".join(reason.split())[:2000]
        log.warning("dead-lettered %s[%d]@%d: %s", record.topic, record.partition, record.offset, reason)
        batch.add_dead_letter(record, reason)
        self._dead_letter_budget.observe(True, reason)

    def _after_run_end(self, run_ids: list[str]) -> None:
        """Runs whose run ended is now stored (so are their earlier events), to the hook. After the commit, so a
        hook that fails costs its own result, never the pipeline's progress."""
        if self._on_run_ended is None:
            return
        for run_id in dict.fromkeys(run_ids):  # a run ended delivered twice in one batch: evaluated once
            try:
                self._on_run_ended(run_id)
            except Exception:
                log.exception("ingest: run ended hook failed for run %s", run_id)

    def _publish(self, batch: Batch) -> None:
        """Alerts to the alerts topic, dead letters to the dead-letter topic; delivered before the commit. One the
        broker refuses (flush raises) leaves the batch uncommitted, to be read and published again: the alert keeps
        its id and dedup key, and the alert consumer records each (sink, key, state) once, so it pages once."""
        if self._alert_producer is None or not (batch.alerts or batch.dead_letters):
            return
        for alert in batch.alerts:
            self._alert_producer.append(self._settings.topic(ALERTS), alert.run_id.encode(),
                                        self._codec.encode(alert))
        for key, (topic, partition, offset, reason, payload) in zip(batch.dead_letter_keys, batch.dead_letters):
            self._alert_producer.append(self._settings.topic(DEAD_LETTERS), key or b"",
                                        dead_letter_message(topic, partition, offset, reason, payload))
        undelivered = self._alert_producer.flush(self._settings.flush_timeout_seconds)
        if undelivered:
            raise TransportError(f"{undelivered} alerts or dead letters not delivered")

    def held(self) -> int:
        """Records polled but not yet committed: in the batch being built and in the one being stored."""
        return len(self._batch.records) + (len(self._in_flight[0].records) if self._in_flight else 0)

    def lag(self, fresh: bool = True) -> int | None:
        """Records in the transport not yet stored (polled-but-uncommitted ones included)."""
        lag = self._consumer.lag(fresh)
        return None if lag is None else lag + self.held()

    def close(self) -> None:
        self._consumer.on_revoke = None
        self._store.close()  # an insert still running finishes first
        self._consumer.close()
        if self._alert_producer is not None:
            self._alert_producer.close()
        if self._on_run_ended is not None:
            self._on_run_ended.close()
        if callable(close_printer := getattr(self._on_alert, "close", None)):
            close_printer()
        if self._parser is not None:
            self._parser.close()
        self._writer.close()  # chdb serves one data directory per process: let go of it

    def drain(self, idle_seconds: float = 1.0, deadline: float | None = None,
              stop: threading.Event | None = None) -> bool:
        """Consume until caught up: partitions assigned, nothing pending in the transport, and nothing new for
        `idle_seconds`; everything stored. Returns False when the deadline or `stop` came first."""
        idle_since = time.monotonic()
        waiting_since = time.monotonic()
        caught_up = False
        while (deadline is None or time.monotonic() < deadline) and not (stop and stop.is_set()):
            if self.run_once(poll_timeout=0.1):
                idle_since = waiting_since = time.monotonic()
            elif self.held():
                self.run_once(poll_timeout=0, force_flush=True)
            elif time.monotonic() - idle_since >= idle_seconds:
                if self._caught_up():
                    caught_up = True
                    break
                if time.monotonic() - waiting_since >= 30:
                    waiting_since = time.monotonic()
                    log.warning("ingest: still draining: %s", "no partitions assigned yet"
                                if not self._consumer.assigned() else f"{self.lag(fresh=False)} records pending")
        if self.held() or self._batch:  # stopped early: store and commit what is held
            self.run_once(poll_timeout=0, force_flush=True)
        return caught_up

    def _caught_up(self) -> bool:
        try:
            return self._consumer.assigned() and self.lag(fresh=True) == 0
        except TransportError:
            return False


def event_topics(settings: Settings) -> list[str]:
    return sorted({settings.topic(topic_for(kind)) for kind in EVENT_TYPES if topic_for(kind) not in CONSUMER_TOPICS})
