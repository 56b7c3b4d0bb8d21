"""The alert consumer (`trainwire alerts`): its own consumer group on the alerts topic. For each alert it records, in
the outbox, a delivery for every sink whose route takes it, then commits; the sink workers page from the outbox.

At-least-once from Kafka, idempotent by (sink, de-duplication key, state): an alert read twice pages once.
"""

from __future__ import annotations

import logging
import threading
import time

from trainwire.infra.codecs import codec_for
from trainwire.infra.config import Settings
from trainwire.infra.log import LogConsumer, TransportError, ensure_topics, open_consumer
from trainwire.infra.log.base import next_positions
from trainwire.infra.log.topics import ALERTS
from trainwire.schemas import Alert, Codec, CodecUnavailableError, SchemaError

from .dispatcher import Dispatcher
from .outbox import Outbox
from .sinks import Sink, build_sinks
from .stop_switch import StopSwitchSink

log = logging.getLogger(__name__)
ALERTS_GROUP = "alerts-pager"  # scoped by the topic prefix like the topics
POLL_RECORDS = 500


def outbox_path(settings: Settings):
    return settings.home / "alerting" / "outbox.db"


class AlertConsumer:
    def __init__(self, consumer: LogConsumer, sinks: list[Sink], outbox: Outbox, dispatcher: Dispatcher,
                 codec: Codec):
        self._consumer = consumer
        self.sinks = sinks
        self.outbox = outbox
        self.dispatcher = dispatcher
        self._codec = codec
        self.read = self.enqueued = self.undecodable = 0
        self._must_rewind = False

    def run_once(self, timeout: float = 0.2) -> int:
        try:
            if self._must_rewind:
                self._consumer.rewind()
                self._must_rewind = False
            records = self._consumer.poll(POLL_RECORDS, timeout)
            if not records:
                return 0
            deliveries = [(sink.name, alert) for alert in self._alerts(records)
                          for sink in self.sinks if sink.accepts(alert)]
            new = self.outbox.enqueue(deliveries)
            self._consumer.commit(next_positions(records))
        except (TransportError, CodecUnavailableError) as err:  # read again from the last commit; the outbox
            log.warning("alerting: %s; rewinding to the last commit", err)  # ignores what it already has
            time.sleep(0.5)
            self._must_rewind = True  # at the next poll, where a failed rewind is retried like any failure
            return 0
        self.read += len(records)
        self.enqueued += new
        self.dispatcher.wake({name for name, _ in deliveries})
        return len(records)

    def _alerts(self, records) -> list[Alert]:
        alerts = []
        for record in records:
            try:
                if record.value is None:
                    raise SchemaError("null value (a tombstone)")
                kind, fields = self._codec.decode_record(record.value)
                if kind != "alert":
                    raise SchemaError(f"a {kind} event on the alerts topic")
                alerts.append(Alert.model_validate(fields))
            except CodecUnavailableError:
                raise
            except Exception as err:  # the ingest tier writes this topic; a record that is no alert: say so, go on
                self.undecodable += 1
                log.error("alerting: skipped %s[%d]@%d, not an alert: %s", record.topic, record.partition,
                          record.offset, err)
        return alerts

    def drain(self, idle_seconds: float, stop: threading.Event, settle_seconds: float = 30.0) -> bool:
        """Read until caught up (partitions assigned, nothing pending, quiet for `idle_seconds`), then wait up to
        `settle_seconds` for the pages still pending; returns whether none is left pending."""
        quiet = 0.0
        while not stop.is_set():
            quiet = 0.0 if self.run_once(0.2) else quiet + 0.2
            if quiet >= idle_seconds and self._caught_up():
                break
        waited = 0.0
        while (pending := sum(row["pending"] for row in self.outbox.summary())) and waited < settle_seconds:
            if stop.wait(0.2):
                break
            waited += 0.2
        return not pending

    def _caught_up(self) -> bool:
        try:
            return self._consumer.assigned() and self._consumer.lag(fresh=True) == 0
        except TransportError:
            return False

    def close(self) -> None:
        self.dispatcher.stop()
        self._consumer.close()
        for sink in self.sinks:
            sink.close()
        self.outbox.close()


def build_alerting(settings: Settings, group: str = ALERTS_GROUP, on_delivered=None,
                   stop_switch: bool = True) -> AlertConsumer:
    """The alert consumer with the configured sinks, and the stop switch (it acts only on opted-in runs)."""
    sinks: list[Sink] = list(build_sinks(settings.alerting))
    if stop_switch:
        sinks.append(StopSwitchSink(settings))
    outbox = Outbox(outbox_path(settings))
    ensure_topics(settings, [settings.topic(ALERTS)])
    consumer = open_consumer(settings, settings.topic(group), [settings.topic(ALERTS)])
    dispatcher = Dispatcher(sinks, outbox, settings.alerting, on_delivered).start()
    return AlertConsumer(consumer, sinks, outbox, dispatcher, codec_for(settings))


def run_alerting(consumer: AlertConsumer, stop: threading.Event, settle_seconds: float = 0.0) -> None:
    """Page until `stop`; then, given `settle_seconds`, read what was published last and wait that long at most for
    the pages still pending (a short-lived process that must not exit with its last pages unsent)."""
    try:
        while not stop.is_set():
            consumer.run_once()
        if settle_seconds > 0:
            consumer.drain(idle_seconds=1.0, stop=threading.Event(), settle_seconds=settle_seconds)
    finally:
        consumer.close()
