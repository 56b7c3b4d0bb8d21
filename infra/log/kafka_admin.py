"""What trainwire asks of a Kafka cluster before it starts: that it answers (the start-up check) and that the
topics exist, replicated as the settings say (docs/kafka.md, "Topics")."""

from __future__ import annotations

import logging
import time

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ClusterMetadata, NewTopic

from ..config import ConfigError, Settings
from .base import TransportError, TransportUnavailableError
from .kafka_client import admin_config, client_properties, describe, describe_config_error, is_misconfigured, reason

log = logging.getLogger(__name__)
MAX_DEFAULT_REPLICAS = 3
CHECK_SECONDS = 10.0

# The check's own client logs nowhere: what it finds is said once, by the check.
_check_log = logging.getLogger("trainwire.librdkafka.check")
_check_log.propagate = False
_check_log.addHandler(logging.NullHandler())
_warned_under_replicated: set[str] = set()


def check_connection(settings: Settings, timeout: float = CHECK_SECONDS) -> int:
    """Ask the cluster for its metadata; returns how many brokers answer. Raises TransportUnavailableError with
    one line naming the cause and the setting to check, as soon as the cause is known, else after `timeout`."""
    errors: list[KafkaError] = []
    where = f"cannot connect to Kafka at {settings.kafka}"
    try:
        admin = AdminClient(client_properties(settings) | {"logger": _check_log, "error_cb": errors.append})
    except KafkaException as err:
        raise TransportUnavailableError(f"{where}: {describe_config_error(err)}") from None
    deadline = time.monotonic() + timeout
    last: KafkaError | None = None
    while True:
        try:
            return len(admin.list_topics(timeout=max(0.1, min(0.5, deadline - time.monotonic()))).brokers)
        except KafkaException as err:
            last = err.args[0] if err.args and isinstance(err.args[0], KafkaError) else last
        admin.poll(0)  # serves error_cb
        cause = next((e for e in errors if is_misconfigured(e)), None)
        if cause is not None or time.monotonic() >= deadline:
            break
    cause = cause or next((e for e in reversed(errors) if e.code() != KafkaError._ALL_BROKERS_DOWN), last)
    if cause is None:
        raise TransportUnavailableError(f"{where}: no answer within {timeout:g} s: check TRAINWIRE_KAFKA")
    raise TransportUnavailableError(f"{where}: {describe(cause, settings)}")


def replication_for(settings: Settings, brokers: int) -> tuple[int, int]:
    """The replication factor and min.insync.replicas of the topics trainwire creates on `brokers` brokers."""
    replicas = settings.kafka_replication_factor
    if replicas is not None and replicas > brokers:
        raise ConfigError(f"TRAINWIRE_KAFKA_REPLICATION_FACTOR is {replicas} but the cluster at {settings.kafka} "
                          f"has {brokers} broker(s): trainwire creates no topic it cannot replicate as asked")
    replicas = replicas or min(MAX_DEFAULT_REPLICAS, brokers)
    insync = settings.kafka_min_insync_replicas or min(2, replicas)
    if insync > replicas:
        raise ConfigError(f"TRAINWIRE_KAFKA_MIN_INSYNC_REPLICAS is {insync} but topics get {replicas} replica(s) on "
                          f"{brokers} broker(s): no write could succeed")
    return replicas, insync


def create_topics(settings: Settings, topics: list[str], partitions: int | None = None,
                  config: dict[str, str] | None = None) -> None:
    """Create the missing topics with the configured partitions, replication, min.insync.replicas and retention
    (`config`: more topic configs, or other values, e.g. cleanup.policy=compact); say once (a warning) which existing
    ones have fewer replicas than that."""
    admin = AdminClient(admin_config(settings))
    try:
        metadata = admin.list_topics(timeout=30)
    except KafkaException as err:
        raise TransportError(f"cannot read the metadata of the cluster at {settings.kafka}: {reason(err)}") from err
    replicas, insync = replication_for(settings, len(metadata.brokers))
    existing = {t for t in topics if t in metadata.topics and metadata.topics[t].error is None}
    _warn_under_replicated(metadata, sorted(existing), replicas)
    missing = [t for t in topics if t not in existing]
    if not missing:
        return
    config = {"min.insync.replicas": str(insync), "retention.ms": str(int(settings.kafka_retention_hours * 3.6e6)),
              **(config or {})}
    futures = admin.create_topics([NewTopic(t, num_partitions=partitions or settings.kafka_partitions,
                                            replication_factor=replicas, config=config) for t in missing])
    for topic, future in futures.items():
        try:
            future.result(timeout=30)
        except KafkaException as err:
            code = err.args[0].code()
            if code == KafkaError.TOPIC_ALREADY_EXISTS:
                continue
            if code in (KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.CLUSTER_AUTHORIZATION_FAILED):
                raise TransportUnavailableError(
                    f"not allowed to create topic {topic} as {settings.kafka_sasl_username or 'this client'}: "
                    f"create it as an admin ({partitions or settings.kafka_partitions} partitions, replication "
                    f"factor {replicas}) or grant CREATE") from None
            raise TransportError(f"cannot create topic {topic}: {reason(err)}") from err


def _warn_under_replicated(metadata: ClusterMetadata, topics: list[str], replicas: int) -> None:
    short = {t: min(len(p.replicas) for p in metadata.topics[t].partitions.values()) for t in topics
             if metadata.topics[t].partitions and t not in _warned_under_replicated}
    short = {t: n for t, n in short.items() if n < replicas}
    if short:
        _warned_under_replicated.update(short)
        log.warning("trainwire: topic(s) %s have fewer replicas than the %d wanted (TRAINWIRE_KAFKA_REPLICATION_FACTOR, "
                    "or min(3, brokers)): losing a broker loses their data or stops their writes; add replicas with "
                    "kafka-reassign-partitions", ", ".join(f"{t} ({n})" for t, n in short.items()), replicas)
