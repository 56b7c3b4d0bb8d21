"""The alert consumer (`trainwire alerts`): its own consumer group on the alerts topic. For each alert it records, in
the outbox, a delivery for every sink whose route takes it, as the paging policy decides (silences, flapping,
storms: paging.py), then commits; the sink workers page from the outbox.

At-least-once from Kafka, idempotent by (sink, de-duplication key, state): an alert read twice pages once.
"""

from __future__ import annotations

import logging
import threading
import time

from trainwire.infra.codecs import codec_for
from trainwire.infra.config import Settings
from trainwire.infra.log import LogConsumer, TransportError, ensure_topics, open_consumer
from trainwire.infra.log.base import FatalTransportError, next_positions
from trainwire.infra.log.topics import ALERTS
from trainwire.schemas import Alert, Codec, CodecUnavailableError, SchemaError

from .dispatcher import Dispatcher
from .outbox import Outbox
from .paging import Pager
from .silencing import SilenceWatch
from .sinks import Sink, build_sinks
from .stop_switch import StopSwitchSink

log = logging.getLogger(__name__)
ALERTS_GROUP = "alerts-pager"  # scoped by the topic prefix like the topics
POLL_RECORDS = 500
TICK_SECONDS = 1.0  # how often silences that ended are looked for
FORGET_SECONDS = 60.0


def outbox_path(settings: Settings):
    return settings.home / "alerting" / "outbox.db"


class AlertConsumer:
    def __init__(self, consumer: LogConsumer, sinks: list[Sink], outbox: Outbox, dispatcher: Dispatcher,
                 codec: Codec, pager: Pager, silences: SilenceWatch):
        self._consumer = consumer
        self.sinks = sinks
        self.outbox = outbox
        self.dispatcher = dispatcher
        self._codec = codec
        self.pager = pager
        self.silences = silences
        self.read = self.enqueued = self.undecodable = 0
        self._must_rewind = False
        self._next_tick = self._next_forget = 0.0

    def run_once(self, timeout: float = 0.2) -> int:
        self._tick()
        try:
            if self._must_rewind:
                self._consumer.rewind()
                self._must_rewind = False
            records = self._consumer.poll(POLL_RECORDS, timeout)
            if not records:
                return 0
            alerts = self._alerts(records)
            hosts = self.silences.hosts([a.run_id for a in alerts], "host" in self.pager.settings.group_by)
            new = self.pager.record(alerts, self.sinks, self.silences.active(), hosts)
            self._consumer.commit(next_positions(records))
        except FatalTransportError:  # fenced by a member with the same instance id: retrying cannot help
            raise
        except (TransportError, CodecUnavailableError) as err:  # read again from the last commit; the outbox
            log.warning("alerting: %s; rewinding to the last commit", err)  # ignores what it already has
            time.sleep(0.5)
            self._must_rewind = True  # at the next poll, where a failed rewind is retried like any failure
            return 0
        self.read += len(records)
        self.enqueued += new
        if new:
            self.dispatcher.wake({sink.name for sink in self.sinks})
        return len(records)

    def _tick(self) -> None:
        """Read the silences when due, and page what silences that ended held back."""
        now = time.monotonic()
        if now < self._next_tick:
            return
        self._next_tick = now + TICK_SECONDS
        self.silences.refresh()
        if self.pager.release_silenced(self.silences.active()):
            self.dispatcher.wake({sink.name for sink in self.sinks})
        if now >= self._next_forget:
            self._next_forget = now + FORGET_SECONDS
            self.pager.forget_old()

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
        `settle_seconds` for the pages still pending that are due by then; returns whether none of those is left.
        Pages held for later (a resolution held, a flapping incident settling) stay in the outbox for the next
        consumer."""
        quiet = 0.0
        while not stop.is_set():
            quiet = 0.0 if self.run_once(0.2) else quiet + 0.2
            if quiet >= idle_seconds and self._caught_up():
                break
        waited, deadline = 0.0, time.time() + settle_seconds
        while (pending := self.outbox.pending_due_by(deadline)) and waited < settle_seconds:
            self._tick()
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
        self.silences.close()
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
    pager = Pager(outbox, settings.alerting)
    silences = SilenceWatch(settings)
    silences.refresh(force=True)  # before the first alert is read
    dispatcher = Dispatcher(sinks, outbox, settings.alerting, on_delivered).start()
    return AlertConsumer(consumer, sinks, outbox, dispatcher, codec_for(settings), pager, silences)


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
