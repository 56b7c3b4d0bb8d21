"""Every Kafka client trainwire makes takes its librdkafka properties from here: one place that turns the settings
(bootstrap, security, the pass-through table) into a dict, and one that says what a librdkafka error means.

librdkafka logs every failed reconnect (some 20 lines a second while a broker refuses us) and calls `error_cb` with
the same news: the logs go to the `trainwire.librdkafka` logger, the errors become one line each that names the
setting to check, and each kind of line is said at most once a minute.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

from confluent_kafka import KafkaError, KafkaException

from ..config import Settings


class RepeatedLineFilter(logging.Filter):
    """One line of a kind (its text, numbers aside) per `seconds`: while a broker is down librdkafka logs every
    failed reconnect, some 20 lines a second, and the caller hears of the outage from its own calls anyway."""

    def __init__(self, seconds: float):
        super().__init__()
        self._seconds = seconds
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        facility, client = (record.args[:2] if isinstance(record.args, tuple) and len(record.args) == 3
                            else ("", ""))
        if facility == "FATAL" and "consumer" in str(client):
            return False  # KafkaLogConsumer raises it as a FatalTransportError: one line, not two
        if facility == "FAIL":
            return False  # a failed connection: error_cb says it too, naming the setting to check
        kind, now = re.sub(r"\d+", "#", record.getMessage()), time.monotonic()
        if now - self._last.get(kind, float("-inf")) < self._seconds:
            return False
        if len(self._last) > 1000:
            self._last = {k: t for k, t in self._last.items() if now - t < self._seconds}
        self._last[kind] = now
        return True


# librdkafka logs go to Python logging, not stderr (confluent-kafka calls log(level, "%s [%s] %s", facility,
# client, text) on the logger it is given)
librdkafka_log = logging.getLogger("trainwire.librdkafka")
librdkafka_log.addFilter(RepeatedLineFilter(60.0))


def reason(err: KafkaException) -> str:
    """librdkafka's text for the error, without the KafkaError{code=…} wrapping."""
    error = err.args[0] if err.args else None
    return error.str() if isinstance(error, KafkaError) else str(err)


def client_properties(settings: Settings) -> dict:
    """The librdkafka properties every client shares: bootstrap servers, security, then the pass-through table."""
    properties: dict = {"bootstrap.servers": settings.kafka, "security.protocol": settings.kafka_security_protocol}
    if settings.kafka_sasl_mechanism:
        properties["sasl.mechanism"] = settings.kafka_sasl_mechanism
    if settings.kafka_sasl_username:
        properties["sasl.username"] = settings.kafka_sasl_username
    if settings.kafka_sasl_password:
        properties["sasl.password"] = settings.kafka_sasl_password.get_secret_value()
    for key, value in (("ssl.ca.location", settings.kafka_ssl_ca_location),
                       ("ssl.certificate.location", settings.kafka_ssl_certificate_location),
                       ("ssl.key.location", settings.kafka_ssl_key_location)):
        if value is not None:
            properties[key] = str(value)
    if settings.kafka_ssl_key_password:
        properties["ssl.key.password"] = settings.kafka_ssl_key_password.get_secret_value()
    for key, value in settings.kafka_client.items():
        properties[key] = value.get_secret_value() if hasattr(value, "get_secret_value") else value
    return properties


def producer_config(settings: Settings) -> dict:
    tunable = {
        "compression.type": "lz4",
        "linger.ms": 5,
        "batch.size": 1_000_000,
        "queue.buffering.max.messages": 1_000_000,
    }
    return tunable | client_properties(settings) | _routed(settings, "producer") | {
        "enable.idempotence": True,
        "acks": "all",
        # Same key → same partition as the Java client, so a run's events keep their order everywhere.
        "partitioner": "murmur2_random",
    }


def consumer_config(settings: Settings, group: str, instance_id: str | None = None) -> dict:
    tunable = {
        # A member that stops heartbeating keeps its partitions this long (librdkafka's default is 45 s; the
        # broker's group.min.session.timeout.ms, 6 s, is the floor). A static member restarted under the same
        # instance id takes them back at once, without waiting it out.
        "session.timeout.ms": 10_000,
        "heartbeat.interval.ms": 3_000,
        "auto.offset.reset": "earliest",
        "partition.assignment.strategy": "cooperative-sticky",
        "fetch.wait.max.ms": 100,
        # librdkafka prefetches up to this much per partition: bound it, memory grows with partitions otherwise
        "queued.max.messages.kbytes": 8192,
    }
    owned = {"group.id": group, "enable.auto.commit": False, "enable.auto.offset.store": False}
    if instance_id is not None:
        owned["group.instance.id"] = instance_id
    return tunable | client_properties(settings) | _routed(settings, "consumer") | owned


def admin_config(settings: Settings) -> dict:
    return client_properties(settings) | _routed(settings, "admin client")


def _routed(settings: Settings, client: str) -> dict:
    return {"logger": librdkafka_log, "error_cb": error_logger(settings, client)}


def error_logger(settings: Settings, client: str) -> Callable[[KafkaError], None]:
    """An error_cb that logs each error as one line naming what to check (the logger's filter rate-limits it)."""
    def log_error(error: KafkaError) -> None:
        if error.code() == KafkaError._ALL_BROKERS_DOWN:
            return  # said better by the error of the connection that failed
        level = logging.WARNING if error.code() in _TRANSIENT else logging.ERROR
        librdkafka_log.log(level, "kafka %s: %s", client, describe(error, settings))

    return log_error


_TRANSIENT = frozenset({KafkaError._TRANSPORT, KafkaError._RESOLVE, KafkaError._TIMED_OUT,
                        KafkaError._ALL_BROKERS_DOWN})


def is_misconfigured(error: KafkaError) -> bool:
    """Whether retrying cannot help: the credentials, the certificates or the protocol are wrong."""
    text = error.str()
    return (error.code() in (KafkaError._AUTHENTICATION, KafkaError._SSL) or "SSL handshake failed" in text
            or "security.protocol" in text)


def describe(error: KafkaError, settings: Settings) -> str:
    """One line: what went wrong and which setting to check. Never a credential (librdkafka prints none)."""
    text, code = error.str(), error.code()
    host = _broker(text) or settings.kafka
    detail = _detail(text)
    if code == KafkaError._AUTHENTICATION:
        mechanism = settings.kafka_sasl_mechanism
        if "mechanism handshake failed" in text or "supported mechanisms" in text:
            return (f"{host} does not offer SASL {mechanism} ({detail}): check TRAINWIRE_KAFKA_SASL_MECHANISM, "
                    "TRAINWIRE_KAFKA_SECURITY_PROTOCOL and the port in TRAINWIRE_KAFKA")
        user = settings.kafka_sasl_username or "(none)"
        return (f"authentication failed for user {user} with {mechanism}: check TRAINWIRE_KAFKA_SASL_USERNAME/"
                f"PASSWORD ({detail})")
    if code == KafkaError._SSL or "SSL handshake failed" in text:
        if "PLAINTEXT broker listener" in text or "closed by peer" in text:
            return (f"TLS handshake with {host} failed: the listener does not speak TLS (a PLAINTEXT one?): check "
                    "TRAINWIRE_KAFKA_SECURITY_PROTOCOL and the port in TRAINWIRE_KAFKA")
        if "certificate verify failed" in text:
            return (f"TLS handshake with {host} failed: certificate verify failed: check "
                    "TRAINWIRE_KAFKA_SSL_CA_LOCATION (and that the broker's certificate names the host in "
                    "TRAINWIRE_KAFKA)")
        return f"TLS handshake with {host} failed: {detail}: check the TRAINWIRE_KAFKA_SSL_* settings"
    if "security.protocol" in text:  # librdkafka's hint: e.g. plaintext to a TLS listener
        return (f"{host} closed the connection before answering ({detail}): it may expect TLS or SASL: check "
                "TRAINWIRE_KAFKA_SECURITY_PROTOCOL")
    if code == KafkaError._RESOLVE:
        return f"cannot resolve {host} ({detail}): check TRAINWIRE_KAFKA"
    if code in _TRANSIENT:
        return f"cannot reach {host} ({detail}): check TRAINWIRE_KAFKA and that the broker is up"
    return f"{detail}"


def describe_config_error(err: KafkaException) -> str:
    """What a client refused to be built with (librdkafka checks its properties at construction)."""
    text = reason(err)
    for key in ("ssl.ca.location", "ssl.certificate.location", "ssl.key.location", "ssl.key.password",
                "sasl.mechanism", "sasl.username", "sasl.password"):
        if key in text:
            return f"invalid Kafka client setting: {text}: check TRAINWIRE_{_setting_of(key)}"
    return f"invalid Kafka client setting: {text}: check TRAINWIRE_KAFKA_CLIENT"


def _setting_of(key: str) -> str:
    return "KAFKA_" + key.replace(".", "_").upper()


_BROKER_PREFIX = re.compile(r"^(?:[a-z_]+://)?(?P<host>[^/\s]+)/(?:bootstrap|\d+): ")
_AFTER = re.compile(r"\s*\(after \d+ms in state \w+\)")


def _broker(text: str) -> str | None:
    match = _BROKER_PREFIX.match(text)
    return match["host"] if match else None


def _detail(text: str) -> str:
    return _AFTER.sub("", _BROKER_PREFIX.sub("", text, count=1)).strip()
