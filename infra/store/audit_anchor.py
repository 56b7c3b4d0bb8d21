"""The audit log's head kept outside the store: an append-only file of signed heads, and optionally a compacted
Kafka topic (`<prefix>audit-head`, keyed by the store).

After each append the new head (seq, entry hash, signature) is written here; `trainwire audit verify` then
requires the store to still hold the latest anchored head, so a truncated or rewritten tail is caught without a
head noted by hand. One file may anchor several stores: each line names its store.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from trainwire.infra.config import Settings

log = logging.getLogger(__name__)
HEAD_TOPIC = "audit-head"


def anchor_line(store: str, seq: int, entry_hash: str, signing_key: str, signature: str) -> dict[str, Any]:
    return {"store": store, "seq": seq, "entry_hash": entry_hash, "key_id": signing_key, "signature": signature,
            "anchored_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")}


def append_anchor(path: Path, line: dict[str, Any]) -> None:
    """One JSON line, appended (O_APPEND: never over what is there) and on disk before returning."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(descriptor, (json.dumps(line, sort_keys=True) + "\n").encode())
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def latest_anchor(path: Path, store: str) -> dict[str, Any] | None:
    """The anchored head with the highest sequence number for this store; None when none is anchored."""
    latest = None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return None
    for number, text in enumerate(lines, 1):
        try:
            line = json.loads(text)
        except ValueError:  # a torn last line after a crash mid-write: the lines before it still stand
            log.warning("%s:%d: not an anchor line, skipped", path, number)
            continue
        if isinstance(line, dict) and line.get("store") == store and (latest is None or line["seq"] > latest["seq"]):
            latest = line
    return latest


class HeadPublisher:
    """Publishes each anchored head to the compacted `<prefix>audit-head` topic when Kafka is configured."""

    def __init__(self, settings: Settings):
        from trainwire.infra.log.factory import ensure_topics, open_producer

        self.topic = settings.topic(HEAD_TOPIC)
        # one partition keeps a store's heads in order; compaction keeps the last of each store
        ensure_topics(settings, [self.topic], partitions=1, config={"cleanup.policy": "compact"})
        self._producer = open_producer(settings)

    def publish(self, line: dict[str, Any]) -> None:
        self._producer.append(self.topic, line["store"].encode(), json.dumps(line, sort_keys=True).encode())
        if self._producer.flush(5.0):
            log.error("audit head %s of %s not confirmed by Kafka within 5 s", line["seq"], line["store"])


def published_head(settings: Settings, store: str, timeout: float = 10.0) -> dict[str, Any] | None:
    """The last head published for this store on the topic (read whole: it is compacted, one line per store)."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

    from trainwire.infra.log.kafka_client import client_properties

    topic = settings.topic(HEAD_TOPIC)
    consumer = Consumer({**client_properties(settings), "group.id": f"trainwire-audit-verify-{os.getpid()}",
                         "enable.auto.commit": False})
    try:
        try:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=timeout)
        except KafkaException as err:
            if "UNKNOWN_TOPIC" in str(err):  # nothing published yet
                return None
            raise
        consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        latest, position = None, low
        while position < high:
            message = consumer.poll(timeout)
            if message is None:
                break
            if message.error() is None:
                position = message.offset() + 1
                if message.key() == store.encode():
                    line = json.loads(message.value())
                    latest = line if latest is None or line["seq"] > latest["seq"] else latest
        return latest
    finally:
        consumer.close()
