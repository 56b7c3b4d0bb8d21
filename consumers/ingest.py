"""The ingest loop: poll → decode and validate → detect → insert into ClickHouse → publish alerts → commit.

Offsets are committed only after the batch is inserted (at-least-once); event ids and ReplacingMergeTree
turn redeliveries into one stored row. A record that cannot become a valid event, that its topic does not
carry, or that ClickHouse refuses goes to `dead_letters` with its reason and the loop goes on; only an
unavailable dependency (broker, store, schema registry) makes it drop the batch and read it again.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Protocol

from trainwire.infra.config import Settings
from trainwire.infra.log import LogConsumer, LogProducer, Record, TransportError
from trainwire.infra.log.base import FatalTransportError, next_positions
from trainwire.infra.log.topics import ALERTS, CONSUMER_TOPICS, DEAD_LETTERS, dead_letter_message, topic_for
from trainwire.schemas import EVENT_TYPES, Alert, Codec, CodecUnavailableError, SchemaError, SingleObjectCodec
from trainwire.schemas.checks import check_record
from trainwire.schemas.codec import CorruptPayloadError

from .admission import Admission, DeadLetterBudget
from .detectors import DetectorEngine, HistoryUnavailableError
from .metrics import IngestMetrics
from .rows import to_row
from .writer import ClickHouseWriter, StoreWriteError

log = logging.getLogger(__name__)
RETRYABLE = (TransportError, StoreWriteError, CodecUnavailableError, HistoryUnavailableError)
MAX_BACKOFF_SECONDS = 30.0
TICK_SECONDS = 1.0  # how often time-based detectors (run_stalled) are judged
PAGE_NOW = frozenset({"critical", "block"})  # a batch holding such a firing alert is flushed at once: someone waits


@dataclass
class _Batch:
    rows: dict[str, list[list]] = field(default_factory=lambda: defaultdict(list))
    sources: dict[str, list[Record]] = field(default_factory=lambda: defaultdict(list))  # parallel to rows
    dead_letters: list[list] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)
    dead_letter_keys: list[bytes | None] = field(default_factory=list)
    ended_runs: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    urgent: bool = False

    def add_alerts(self, alerts: list[Alert]) -> None:
        self.alerts.extend(alerts)
        self.urgent = self.urgent or any(a.state == "firing" and a.severity in PAGE_NOW for a in alerts)

    def add_dead_letter(self, record: Record, reason: str) -> None:
        self.dead_letters.append([record.topic, record.partition, record.offset, reason, record.value or b""])
        self.dead_letter_keys.append(record.key)


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
    print(f"ALERT {alert.state:<8} {alert.severity:<8} {alert.rule:<16} run={alert.run_id} step={alert.step} "
          f"{alert.message}", file=sys.stderr, flush=True)


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
        self._batch = _Batch()
        self._backoff = 0.0
        self._must_rewind = False
        self._admission = Admission(settings)
        self._dead_letter_budget = DeadLetterBudget(settings.dead_letter_max_consecutive,
                                                    settings.dead_letter_max_ratio)
        self.last_stored = time.monotonic()  # when a batch was last stored and committed (or the start)
        self.stats = IngestStats()

    def run_once(self, poll_timeout: float = 0.2, force_flush: bool = False) -> int:
        """Poll once, process what came, flush if the batch is full or old. Returns records polled.

        When a dependency is briefly unavailable (store, transport, schema registry) the uncommitted batch is
        dropped and the consumer rewinds to its last commit after a back-off: nothing lost, nothing skipped.
        """
        try:
            if self._must_rewind:
                self._consumer.rewind()
                self._must_rewind = False
            room = max(1, self._settings.batch_max_rows - len(self._batch.records))
            records = self._consumer.poll(room, poll_timeout)
            now_ms = time.time_ns() // 1_000_000
            decoded = [self._decode(record, now_ms) for record in records]
            self._detectors.prefetch(event for event in decoded if not isinstance(event, SchemaError))
            for record, event in zip(records, decoded):
                self._process(record, event)
            if time.monotonic() - self._ticked >= TICK_SECONDS:
                self._tick()
            batch = self._batch
            if (batch.records or batch.alerts) and (
                    force_flush or batch.urgent or len(batch.records) >= self._settings.batch_max_rows
                    or time.monotonic() - batch.started >= self._settings.batch_max_seconds):
                self.flush()
        except FatalTransportError:  # e.g. fenced by a member with the same instance id: retrying cannot help
            raise
        except RETRYABLE as err:
            self._retry_after(err)
            return 0
        if time.monotonic() - self._lag_checked > 1.0:
            self._lag_checked = time.monotonic()
            self._update_gauges()
        return len(records)

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
            self._batch = _Batch()
            self._dead_letter_budget.rollback()
        self._writer.forget_stored()  # the next owner stores these runs' events from now on
        self._detectors.forget(partitions)  # their runs' state now lives with the new owner

    def _tick(self) -> None:
        self._ticked = time.monotonic()
        alerts = self._detectors.tick(time.time_ns() // 1_000_000)
        if alerts:
            if not self._batch.records and not self._batch.alerts:
                self._batch.started = time.monotonic()
            self._batch.add_alerts(alerts)

    def _retry_after(self, err: Exception) -> None:
        """Drop the uncommitted batch and read it again after a back-off that grows until a batch is stored."""
        self._backoff = min(MAX_BACKOFF_SECONDS, max(0.1, self._backoff * 2))
        self.stats.retries += 1
        self.metrics.retries.inc()
        reason = " ".join(str(err).split())[:500]  # one line: no traceback, no multi-line server stack
        log.warning("ingest: %s: %s; re-reading from the last commit in %.1fs", type(err).__name__, reason,
                    self._backoff)
        self._batch = _Batch()
        self._dead_letter_budget.rollback()
        self._detectors.forget_all()  # it saw the dropped records; from storage it rebuilds what was stored
        time.sleep(self._backoff)
        self._must_rewind = True  # done at the next poll, where a failure to rewind is retried like any other

    def _decode(self, record: Record, now_ms: int) -> tuple[str, dict] | SchemaError:
        """The record as a checked event (kind, fields), or why it cannot be one. Whatever a record holds, its
        failure is its own dead letter, never the process's; only an unreachable schema registry is retried."""
        try:
            if record.value is None:
                raise CorruptPayloadError("null value (a tombstone): trainwire events are never deleted by key")
            kind, fields = self._codec.decode_record(record.value)
            self._admission.check(record.topic, kind, fields, now_ms)
            check_record(kind, fields)
        except CodecUnavailableError:
            raise
        except SchemaError as err:
            return err
        except Exception as err:  # a codec or check tripped on something no test foresaw
            return CorruptPayloadError(f"cannot decode the record: {err!r}")
        return kind, fields

    def _process(self, record: Record, event: tuple[str, dict] | SchemaError) -> None:
        batch = self._batch
        if not batch.records:
            batch.started = time.monotonic()
        batch.records.append(record)
        if isinstance(event, SchemaError):
            self._dead_letter(batch, record, f"{type(event).__name__}: {event}")
            return
        kind, fields = event
        try:
            row = to_row(kind, fields)
        except Exception as err:
            self._dead_letter(batch, record, f"cannot make a {kind} row: {err!r}")
            return
        self._dead_letter_budget.observe(False)
        batch.rows[kind].append(row)
        batch.sources[kind].append(record)
        try:
            alerts = self._detectors.observe(kind, fields, (record.topic, record.partition))
        except HistoryUnavailableError:
            raise
        except Exception:  # the event is stored all the same; a detector bug must not stop ingest
            self.stats.detector_errors += 1
            if self.stats.detector_errors == 1 or self.stats.detector_errors % 1000 == 0:
                log.exception("ingest: detectors failed on a %s event of run %s (%d so far)", kind,
                              fields.get("run_id"), self.stats.detector_errors)
            alerts = []
        if alerts:
            batch.add_alerts(alerts)
        if kind == "run_ended":
            batch.ended_runs.append(fields["run_id"])

    def _dead_letter(self, batch: _Batch, record: Record, reason: str) -> None:
        reason = " ".join(reason.split())[:2000]
        log.warning("dead-lettered %s[%d]@%d: %s", record.topic, record.partition, record.offset, reason)
        batch.add_dead_letter(record, reason)
        self._dead_letter_budget.observe(True, reason)

    def flush(self) -> None:
        batch, self._batch = self._batch, _Batch()
        if not batch.records and not batch.alerts:
            return
        if batch.dead_letters:  # before anything is stored: a tripped limit leaves the whole batch to be read again
            self._dead_letter_budget.judge(len(batch.records), len(batch.dead_letters), batch.dead_letters[-1][3])
        if batch.alerts:
            batch.rows["alert"] = [to_row("alert", a.model_dump()) for a in batch.alerts]
        written = self._writer.write(batch.rows, batch.sources)
        for record, reason in written.refused:
            if record is None:  # an alert row: made here, so a bug to report, never a record to dead-letter
                log.error("ingest: ClickHouse refused an alert row: %s", reason)
                continue
            self._dead_letter(batch, record, reason)
        self._writer.write_dead_letters(batch.dead_letters)
        stored, skipped = written.inserted, written.redeliveries_skipped
        self.metrics.insert_seconds.observe(self._writer.last_insert_seconds)
        self._publish(batch)
        if batch.records:  # a batch of only run_stalled alerts has nothing to commit
            self._consumer.commit(next_positions(batch.records))
            self._dead_letter_budget.commit(len(batch.records), len(batch.dead_letters))
            self.last_stored = time.monotonic()
            self._backoff = 0.0  # progress: the next failure starts its back-off afresh
        for alert in batch.alerts:
            self._on_alert(alert)
        self.stats.consumed += len(batch.records)
        self.metrics.consumed.inc(len(batch.records))
        self.stats.stored += stored
        self.stats.redeliveries_skipped += skipped
        self.metrics.redeliveries_skipped.inc(skipped)
        self.stats.dead_lettered += len(batch.dead_letters)
        self.stats.alerts += len(batch.alerts)
        self.stats.batches += 1
        self.metrics.stored.inc(stored)
        self.metrics.dead_lettered.inc(len(batch.dead_letters))
        self.metrics.alerts.inc(len(batch.alerts))
        self.metrics.batch_rows.observe(len(batch.records))
        self._after_run_end(batch.ended_runs)

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

    def _publish(self, batch: _Batch) -> None:
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

    def lag(self, fresh: bool = True) -> int | None:
        """Records in the transport not yet stored (polled-but-unflushed ones included)."""
        lag = self._consumer.lag(fresh)
        return None if lag is None else lag + len(self._batch.records)

    def close(self) -> None:
        self._consumer.on_revoke = None
        self._consumer.close()
        if self._alert_producer is not None:
            self._alert_producer.close()
        if self._on_run_ended is not None:
            self._on_run_ended.close()
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
            elif self._batch.records:
                self.run_once(poll_timeout=0, force_flush=True)
            elif time.monotonic() - idle_since >= idle_seconds:
                if self._caught_up():
                    caught_up = True
                    break
                if time.monotonic() - waiting_since >= 30:
                    waiting_since = time.monotonic()
                    log.warning("ingest: still draining: %s", "no partitions assigned yet"
                                if not self._consumer.assigned() else f"{self.lag(fresh=False)} records pending")
        if self._batch.records or self._batch.alerts:  # stopped early: store and commit what is held
            self.run_once(poll_timeout=0, force_flush=True)
        return caught_up

    def _caught_up(self) -> bool:
        try:
            return self._consumer.assigned() and self.lag(fresh=True) == 0
        except TransportError:
            return False


def event_topics(settings: Settings) -> list[str]:
    return sorted({settings.topic(topic_for(kind)) for kind in EVENT_TYPES if topic_for(kind) not in CONSUMER_TOPICS})
