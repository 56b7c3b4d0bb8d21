"""The scalable transport: Apache Kafka through confluent-kafka (librdkafka)."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from ..config import Settings
from .base import DeliveryRefusedError, FatalTransportError, LogConsumer, LogProducer, LogTail, Record, TransportError
from .base import TopicPartition as TP
from .instance import ConsumerSlot, check_instance_id, slot_instance_id
from .kafka_client import consumer_config, producer_config, reason

log = logging.getLogger(__name__)


class KafkaLogProducer(LogProducer):
    def __init__(self, settings: Settings):
        self._producer = Producer(producer_config(settings))
        self._refused: list[tuple[str, KafkaError]] = []  # (topic, why) since the last flush, which raises them

    def _on_delivery(self, err: KafkaError | None, msg) -> None:
        if err is not None:
            self._refused.append((msg.topic(), err))

    def append(self, topic: str, key: bytes, value: bytes) -> None:
        while True:
            try:
                self._producer.produce(topic, value=value, key=key, on_delivery=self._on_delivery)
                break
            except BufferError:
                self._producer.poll(0.05)  # local queue full: serve delivery reports until there is room
            except KafkaException as err:
                raise TransportError(f"kafka produce to {topic} failed: {reason(err)}") from err
        self._producer.poll(0)

    def flush(self, timeout: float) -> int:
        undelivered = self._producer.flush(timeout)
        refused, self._refused = self._refused, []
        if refused:
            raise DeliveryRefusedError(describe_refusals(refused))
        return undelivered


def describe_refusals(refused: list[tuple[str, KafkaError]]) -> str:
    """One line: how many messages Kafka refused, per topic and librdkafka's reason."""
    counts = Counter((topic, f"{err.str()} ({err.name()})") for topic, err in refused)
    said = ", ".join(f"{n} to {topic}: {why}" for (topic, why), n in counts.items())
    return f"kafka refused {len(refused)} message{'s' if len(refused) != 1 else ''} ({said})"


FENCE_REJOINS, FENCE_WINDOW_SECONDS = 3, 300.0  # rejoins after a fence before a twin is assumed


class KafkaLogConsumer(LogConsumer):
    """A member of `group`: a static one (see instance.py) under `instance_id`, else under a slot it claims in
    `slot_dir`; a dynamic one when given neither. librdkafka's exceptions leave it as TransportErrors."""

    def __init__(self, settings: Settings, group: str, topics: list[str], instance_id: str | None = None,
                 slot_dir: Path | None = None):
        self._group = group
        self._slot: ConsumerSlot | None = None
        if instance_id is not None:
            check_instance_id(instance_id)
        elif slot_dir is not None:
            try:
                self._slot = ConsumerSlot(slot_dir, group)
                instance_id = slot_instance_id(group, self._slot.index)
            except OSError as err:
                log.warning("no consumer slot under %s (%s): joining group %s without an instance id, so a "
                            "restart waits out the session timeout", slot_dir, err, group)
        self.instance_id = instance_id
        self._assigned = False
        self._fatal: FatalTransportError | None = None
        self._fenced_at: list[float] = []  # when this member was fenced and rejoined, within FENCE_WINDOW_SECONDS
        self._revoked_on_rejoin: set[TP] = set()  # what the fenced consumer held, told to on_revoke at the next poll
        # per assigned partition, its committed offset (negative: none): where it starts until a record is read
        self._committed: dict[TP, int] = {}
        self._config, self._topics = consumer_config(settings, group, self.instance_id), topics
        try:
            self._consumer = self._joined()
        except BaseException:
            self._release_slot()
            raise

    def _joined(self) -> Consumer:
        consumer = Consumer(self._config)
        consumer.subscribe(self._topics, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost)
        return consumer

    def _on_assign(self, consumer, partitions: list[TopicPartition]) -> None:
        # called after every rebalance, with an empty list too: this member has its share, if any
        if consumer is not self._consumer:
            return
        self._assigned = True
        if partitions:
            self._learn_committed(partitions, timeout=5.0)

    def _on_revoke(self, consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._committed.pop((tp.topic, tp.partition), None)
        if consumer is not self._consumer:  # a fenced consumer closing: the caller hears of it at its next poll
            self._revoked_on_rejoin.update((tp.topic, tp.partition) for tp in partitions)
        elif self.on_revoke is not None and partitions:
            self.on_revoke([(tp.topic, tp.partition) for tp in partitions])

    def _on_lost(self, consumer, partitions: list[TopicPartition]) -> None:
        if consumer is self._consumer:
            self._assigned = False  # out of the group (e.g. the session timed out) until it is assigned again
        self._on_revoke(consumer, partitions)

    def _learn_committed(self, partitions: list[TopicPartition], timeout: float) -> None:
        try:
            committed = self._consumer.committed(partitions, timeout=timeout)
        except KafkaException as err:  # lag stays unknown for these until the next try
            log.debug("committed offsets unknown: %s", reason(err))
            return
        for tp in committed:
            self._committed[(tp.topic, tp.partition)] = tp.offset

    def assigned(self) -> bool:
        return self._assigned and self._fatal is None

    def pause(self) -> None:
        super().pause()
        self._pause_assigned()

    def resume(self) -> None:
        super().resume()
        try:
            self._consumer.resume(self._consumer.assignment())
        except KafkaException as err:
            raise TransportError(f"kafka resume failed: {reason(err)}") from err

    def _pause_assigned(self) -> None:
        try:
            self._consumer.pause(self._consumer.assignment())
        except KafkaException as err:
            raise TransportError(f"kafka pause failed: {reason(err)}") from err

    def poll(self, max_records: int, timeout: float) -> list[Record]:
        self._raise_if_fatal()
        self._tell_revoked_on_rejoin()
        if self._paused:  # partitions assigned since the pause are paused too
            self._pause_assigned()
        # Wait for the first record only, then take what is already fetched: consume(n, timeout) would wait out
        # its timeout for n records whenever traffic is light, and a page waits on every hop.
        try:
            first = self._consumer.poll(timeout)
            if first is None:
                return []
            rest = self._consumer.consume(max_records - 1, 0) if max_records > 1 else []
        except KafkaException as err:
            raise TransportError(f"kafka poll failed: {reason(err)}") from err
        out: list[Record] = []
        for msg in (first, *rest):
            err = msg.error()
            if err is not None:
                if err.code() in (KafkaError._PARTITION_EOF, KafkaError.UNKNOWN_TOPIC_OR_PART):
                    continue
                if err.code() == KafkaError._FATAL or err.fatal():
                    raise self._failed_for_good(err)
                log.warning("kafka consumer: %s", err.str())
                continue
            _, ts = msg.timestamp()
            out.append(Record(msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value(), ts))
        return out

    def _failed_for_good(self, err: KafkaError) -> TransportError:
        # librdkafka hands a consumer its fatal error (FENCED_INSTANCE_ID is the one there is) wrapped as _FATAL
        if "fenced" in err.str().lower():
            return self._rejoin_after_fence()
        self._fatal = FatalTransportError(f"kafka consumer of group {self._group} failed for good: {err.str()}")
        return self._fatal

    def _rejoin_after_fence(self) -> TransportError:
        """A static member is fenced when another member joins under its instance id. That other member is most
        often itself: when the group's coordinator dies, librdkafka rejoins at the new one and can be fenced by
        that very rejoin. So it rejoins as a new consumer (the retry that follows reads again from the last
        commit); fenced again and again, it is a true twin, and stops for good."""
        now = time.monotonic()
        self._fenced_at = [t for t in self._fenced_at if now - t < FENCE_WINDOW_SECONDS] + [now]
        message = f"kafka consumer {self.instance_id} was fenced out of group {self._group}"
        if len(self._fenced_at) > FENCE_REJOINS:
            self._fatal = FatalTransportError(
                f"{message} {len(self._fenced_at)} times in {FENCE_WINDOW_SECONDS:.0f} s: another consumer runs "
                "under the same instance id (consumers on one host take distinct ids only under one trainwire home)")
            return self._fatal
        fenced, self._consumer, self._assigned = self._consumer, self._joined(), False
        try:
            self._revoked_on_rejoin.update((tp.topic, tp.partition) for tp in fenced.assignment())
            fenced.close()
        except (KafkaException, RuntimeError) as err:
            log.debug("closing the fenced consumer: %s", err)
        # Raised from within poll or commit, often in the middle of the caller's flush: the caller's retry drops the
        # batch in hand, and its on_revoke (which would flush again) is told at the next poll.
        return TransportError(f"{message}; rejoined it, reading again from the last commit")

    def _tell_revoked_on_rejoin(self) -> None:
        if self._revoked_on_rejoin:
            revoked, self._revoked_on_rejoin = sorted(self._revoked_on_rejoin), set()
            for key in revoked:
                self._committed.pop(key, None)
            if self.on_revoke is not None:
                self.on_revoke(revoked)

    def _raise_if_fatal(self) -> None:
        if self._fatal is not None:
            raise self._fatal

    def commit(self, positions: Mapping[TP, int]) -> None:
        self._raise_if_fatal()
        if not positions:
            return
        offsets = [TopicPartition(t, p, o) for (t, p), o in positions.items()]
        try:
            self._consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as err:
            error = err.args[0] if err.args else None
            if isinstance(error, KafkaError) and (error.code() == KafkaError.FENCED_INSTANCE_ID
                                                  or error.fatal() and "fenced" in error.str().lower()):
                raise self._rejoin_after_fence() from err
            raise TransportError(f"kafka commit failed: {reason(err)}") from err
        self._committed.update(positions)

    def rewind(self) -> None:
        self._raise_if_fatal()
        try:
            assignment = self._consumer.assignment()
            if not assignment:
                return
            for tp in self._consumer.committed(assignment, timeout=10):
                self._committed[(tp.topic, tp.partition)] = tp.offset
                if tp.offset < 0:  # nothing committed yet: back to where auto.offset.reset starts
                    tp.offset = self._consumer.get_watermark_offsets(tp, timeout=10)[0]
                self._consumer.seek(tp)
        except KafkaException as err:
            raise TransportError(f"kafka rewind to the committed offsets failed: {reason(err)}") from err

    def pending(self, fresh: bool = True) -> dict[tuple[str, int], int | None] | None:
        # A fresh answer costs a broker round trip per partition, each queued behind the pending fetch (up to
        # fetch.wait.max.ms): over many partitions, long enough to hold up the loop that asks.
        if not self.assigned():
            return None  # not "nothing pending": nothing known yet
        pending: dict[tuple[str, int], int | None] = {}
        try:
            assignment = self._consumer.assignment()
            positions = {(tp.topic, tp.partition): tp.offset for tp in self._consumer.position(assignment)}
            for tp in assignment:
                key = (tp.topic, tp.partition)
                low, high = self._consumer.get_watermark_offsets(tp, timeout=2.0, cached=not fresh)
                at = positions[key] if positions[key] >= 0 else self._start(tp, low, fresh)
                # high < 0: cached, and nothing heard from this partition yet
                pending[key] = None if high < 0 or at is None else max(0, high - at)
        except KafkaException as err:  # e.g. a leader moving: lag is a metric, unknown for a moment
            log.debug("lag unknown: %s", reason(err))
            return None
        return pending

    def _start(self, tp: TopicPartition, low: int, fresh: bool) -> int | None:
        """Where a partition not read from since it was assigned starts: its committed offset, else its first."""
        key = (tp.topic, tp.partition)
        if key not in self._committed and fresh:
            self._learn_committed([tp], timeout=2.0)
        committed = self._committed.get(key)
        return None if committed is None else max(committed, low)

    def close(self) -> None:
        self._assigned = False
        try:
            self._consumer.close()  # a static member leaves no gap: its restart takes its partitions back
        except KafkaException as err:
            log.warning("kafka consumer of group %s did not close cleanly: %s", self._group, reason(err))
        finally:
            self._release_slot()

    def _release_slot(self) -> None:
        if self._slot is not None:
            self._slot.release()


class KafkaLogTail(LogTail):
    """One topic from `since_ms` on (the records' CreateTime), every partition, assigned: no group membership.

    Partitions are looked up again at every poll until the topic exists, then now and then, so a topic created
    (or grown) after the tail started is read from `since_ms` too.
    """

    REFRESH_SECONDS = 30.0

    def __init__(self, settings: Settings, topic: str, since_ms: int, group: str):
        config = consumer_config(settings, group) | {"enable.partition.eof": False}
        self._consumer = Consumer(config)
        self._topic = topic
        self._since_ms = since_ms
        self._assigned: set[int] = set()
        self._refreshed = float("-inf")

    def _refresh(self) -> None:
        self._refreshed = time.monotonic()
        metadata = self._consumer.list_topics(self._topic, timeout=5)
        topic = metadata.topics.get(self._topic)
        if topic is None or topic.error is not None:
            return  # not created yet
        new = sorted(set(topic.partitions) - self._assigned)
        if not new:
            return
        # the end first, then the first offset at or after since_ms: a record written in between is behind the
        # end, so it is either found by time or read from the end
        ends = {p: self._consumer.get_watermark_offsets(TopicPartition(self._topic, p), timeout=5)[1] for p in new}
        found = self._consumer.offsets_for_times([TopicPartition(self._topic, p, self._since_ms) for p in new],
                                                 timeout=5)
        starts = [TopicPartition(self._topic, tp.partition, tp.offset if tp.offset >= 0 else ends[tp.partition])
                  for tp in found]
        self._consumer.incremental_assign(starts)
        self._assigned.update(new)

    def poll(self, max_records: int, timeout: float) -> list[Record]:
        if not self._assigned or time.monotonic() - self._refreshed >= self.REFRESH_SECONDS:
            try:
                self._refresh()
            except KafkaException as err:
                raise TransportError(f"kafka tail of {self._topic}: {reason(err)}") from err
        if not self._assigned:
            time.sleep(timeout)  # the topic does not exist yet
            return []
        try:
            first = self._consumer.poll(timeout)  # consume() would wait out its timeout for a full batch
            if first is None:
                return []
            rest = self._consumer.consume(max_records - 1, 0) if max_records > 1 else []
        except KafkaException as err:
            raise TransportError(f"kafka tail of {self._topic}: {reason(err)}") from err
        out: list[Record] = []
        for msg in [first, *rest]:
            err = msg.error()
            if err is not None:
                if err.fatal() or err.code() == KafkaError._FATAL:
                    raise TransportError(f"kafka tail of {self._topic}: {err.str()}")
                continue
            _, ts = msg.timestamp()
            if ts >= self._since_ms:
                out.append(Record(msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value(), ts))
        return out

    def close(self) -> None:
        self._consumer.close()
