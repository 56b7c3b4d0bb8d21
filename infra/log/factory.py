"""Pick the transport from settings: Kafka when `TRAINWIRE_KAFKA` is set, else the embedded SQLite log."""

from __future__ import annotations

from ..config import Settings
from .base import LogConsumer, LogProducer, LogTail
from .sqlite import SqliteLogConsumer, SqliteLogProducer, SqliteLogTail


def open_producer(settings: Settings, spooled: bool = False) -> LogProducer:
    """`spooled`: the trainer side's producer, which writes to a local disk spool before Kafka (see spool.py)."""
    if settings.kafka and spooled:
        from .spool import SpoolingProducer

        return SpoolingProducer(settings, settings.spool_dir)
    if settings.kafka:
        from .kafka import KafkaLogProducer

        return KafkaLogProducer(settings)
    return SqliteLogProducer(settings.local_log_path)


def open_consumer(settings: Settings, group: str, topics: list[str], instance_id: str | None = None) -> LogConsumer:
    """`instance_id`: this member's Kafka group.instance.id; by default one per consumer slot of the host (see
    instance.py), so a restarted consumer rejoins as itself. The local log has no use for it."""
    if settings.kafka:
        from .kafka import KafkaLogConsumer

        return KafkaLogConsumer(settings, group, topics, instance_id=instance_id,
                                slot_dir=settings.home / "consumer-slots")
    return SqliteLogConsumer(settings.local_log_path, group, topics)


def open_tail(settings: Settings, topic: str, since_ms: int, group: str) -> LogTail:
    """What is published on `topic` from `since_ms` on, read by this process alone (`group`: a unique name that
    Kafka requires but no member joins; nothing is ever committed)."""
    if settings.kafka:
        from .kafka import KafkaLogTail

        return KafkaLogTail(settings, topic, since_ms, group)
    return SqliteLogTail(settings.local_log_path, topic, since_ms)


def ensure_topics(settings: Settings, topics: list[str], partitions: int | None = None,
                  config: dict[str, str] | None = None) -> None:
    """Create the topics up front on Kafka (the local log needs nothing): `partitions`, else TRAINWIRE_KAFKA_PARTITIONS;
    replication, min.insync.replicas and retention from the settings (kafka_admin.py)."""
    if settings.kafka:
        from .kafka_admin import create_topics

        create_topics(settings, topics, partitions, config)


def check_transport(settings: Settings) -> None:
    """On Kafka, that the cluster answers and accepts us (a bounded wait); raises TransportUnavailableError with
    one line naming the cause. The local log needs no check."""
    if settings.kafka:
        from .kafka_admin import check_connection

        check_connection(settings)
