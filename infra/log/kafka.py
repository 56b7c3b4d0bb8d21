"""The scalable transport: Apache Kafka through confluent-kafka (librdkafka)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from .base import LogConsumer, LogProducer, LogTail, Record, TransportError
from .base import TopicPartition as TP

log = logging.getLogger(__name__)
# librdkafka logs (e.g. one line per failed reconnect while a broker is down) go to Python logging, not stderr
librdkafka_log = logging.getLogger("trainwire.librdkafka")


def producer_config(bootstrap: str) -> dict:
    return {
        "bootstrap.servers": bootstrap,
        "enable.idempotence": True,
        "acks": "all",
        "compression.type": "lz4",
        "linger.ms": 5,
        "batch.size": 1_000_000,
        "queue.buffering.max.messages": 1_000_000,
        # Same key → same partition as the Java client, so a run's events keep their order everywhere.
        "partitioner": "murmur2_random",
    }


def consumer_config(bootstrap: str, group: str) -> dict:
    return {
        "bootstrap.servers": bootstrap,
        "group.id": group,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "partition.assignment.strategy": "cooperative-sticky",
        "fetch.wait.max.ms": 100,
        # librdkafka prefetches up to this much per partition: bound it, memory grows with partitions otherwise
        "queued.max.messages.kbytes": 8192,
    }


class KafkaLogProducer(LogProducer):
    def __init__(self, bootstrap: str):
        self._producer = Producer(producer_config(bootstrap), logger=librdkafka_log)
        self.failed = 0

    def _on_delivery(self, err: KafkaError | None, _msg) -> None:
        if err is not None:
            self.failed += 1
            log.error("kafka delivery failed: %s", err)

    def append(self, topic: str, key: bytes, value: bytes) -> None:
        while True:
            try:
                self._producer.produce(topic, value=value, key=key, on_delivery=self._on_delivery)
                break
            except BufferError:
                self._producer.poll(0.05)  # local queue full: serve delivery reports until there is room
        self._producer.poll(0)

    def flush(self, timeout: float) -> int:
        return self._producer.flush(timeout)


class KafkaLogConsumer(LogConsumer):
    def __init__(self, bootstrap: str, group: str, topics: list[str]):
        self._consumer = Consumer(consumer_config(bootstrap, group), logger=librdkafka_log)
        self._consumer.subscribe(topics, on_revoke=self._revoked, on_lost=self._revoked)

    def _revoked(self, _consumer, partitions: list[TopicPartition]) -> None:
        if self.on_revoke is not None and partitions:
            self.on_revoke([(tp.topic, tp.partition) for tp in partitions])

    def poll(self, max_records: int, timeout: float) -> list[Record]:
        # Wait for the first record only, then take what is already fetched: consume(n, timeout) would wait out
        # its timeout for n records whenever traffic is light, and a page waits on every hop.
        first = self._consumer.poll(timeout)
        if first is None:
            return []
        rest = self._consumer.consume(max_records - 1, 0) if max_records > 1 else []
        out: list[Record] = []
        for msg in (first, *rest):
            err = msg.error()
            if err is not None:
                if err.code() in (KafkaError._PARTITION_EOF, KafkaError.UNKNOWN_TOPIC_OR_PART):
                    continue
                if err.retriable() or not err.fatal():
                    log.warning("kafka consumer: %s", err)
                    continue
                raise TransportError(f"kafka consumer failed: {err}")
            _, ts = msg.timestamp()
            out.append(Record(msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value(), ts))
        return out

    def commit(self, positions: Mapping[TP, int]) -> None:
        if not positions:
            return
        offsets = [TopicPartition(t, p, o) for (t, p), o in positions.items()]
        try:
            self._consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as err:
            raise TransportError(f"kafka commit failed: {err}") from err

    def rewind(self) -> None:
        assignment = self._consumer.assignment()
        if not assignment:
            return
        for tp in self._consumer.committed(assignment, timeout=10):
            if tp.offset < 0:  # nothing committed yet: back to where auto.offset.reset starts
                tp.offset = self._consumer.get_watermark_offsets(tp, timeout=10)[0]
            self._consumer.seek(tp)

    def assigned(self) -> bool:
        try:
            return bool(self._consumer.assignment())
        except KafkaException:
            return False

    def lag(self, fresh: bool = True) -> int | None:
        # A fresh answer costs a broker round trip per partition, each queued behind the pending fetch (up to
        # fetch.wait.max.ms): over many partitions, long enough to hold up the loop that asks.
        total = 0
        try:
            for tp in self._consumer.assignment():
                low, high = self._consumer.get_watermark_offsets(tp, timeout=2.0, cached=not fresh)
                if high < 0:  # cached, and nothing heard from this partition yet
                    continue
                (pos,) = self._consumer.position([tp])
                total += high - (pos.offset if pos.offset >= 0 else low)
        except KafkaException as err:  # e.g. a leader moving: lag is a metric, unknown for a moment
            log.debug("lag unknown: %s", err)
            return None
        return total

    def close(self) -> None:
        self._consumer.close()


class KafkaLogTail(LogTail):
    """One topic from `since_ms` on (the records' CreateTime), every partition, assigned: no group membership.

    Partitions are looked up again at every poll until the topic exists, then now and then, so a topic created
    (or grown) after the tail started is read from `since_ms` too.
    """

    REFRESH_SECONDS = 30.0

    def __init__(self, bootstrap: str, topic: str, since_ms: int, group: str):
        config = consumer_config(bootstrap, group) | {"enable.partition.eof": False}
        self._consumer = Consumer(config, logger=librdkafka_log)
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
                raise TransportError(f"kafka tail of {self._topic}: {err}") from err
        if not self._assigned:
            time.sleep(timeout)  # the topic does not exist yet
            return []
        first = self._consumer.poll(timeout)  # consume() would wait out its timeout for a full batch
        if first is None:
            return []
        out: list[Record] = []
        rest = self._consumer.consume(max_records - 1, 0) if max_records > 1 else []
        for msg in [first, *rest]:
            err = msg.error()
            if err is not None:
                if err.fatal():
                    raise TransportError(f"kafka tail of {self._topic}: {err}")
                continue
            _, ts = msg.timestamp()
            if ts >= self._since_ms:
                out.append(Record(msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value(), ts))
        return out

    def close(self) -> None:
        self._consumer.close()


def create_topics(bootstrap: str, topics: list[str], partitions: int) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(t, num_partitions=partitions, replication_factor=1) for t in topics])
    for topic, future in futures.items():
        try:
            future.result(timeout=30)
        except KafkaException as err:
            if err.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise TransportError(f"cannot create topic {topic}: {err}") from err
