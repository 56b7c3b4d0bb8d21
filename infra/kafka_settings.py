"""Checks of the Kafka client settings (docs/kafka.md): the bootstrap list, the pass-through table of librdkafka
properties, the `[kafka]` table of the config file. Settings (config.py) holds the fields; this says what is valid.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import SecretStr

from .redact import redact_text

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
# What librdkafka's bootstrap.servers takes: [PROTOCOL://]host[:port], comma-separated; IPv6 in brackets.
_SERVER = re.compile(r"^(?:(?P<proto>[A-Za-z_]+)://)?(?P<host>\[[0-9A-Fa-f:.]+(?:%[\w.-]+)?\]|[A-Za-z0-9_.-]+)"
                     r"(?::(?P<port>\d{1,5}))?$")

# Properties trainwire sets itself: each names the setting to use instead, or why it is not the user's to set.
OWNED_PROPERTIES = {
    "bootstrap.servers": "set TRAINWIRE_KAFKA (kafka.bootstrap) instead",
    "metadata.broker.list": "set TRAINWIRE_KAFKA (kafka.bootstrap) instead",
    "security.protocol": "set TRAINWIRE_KAFKA_SECURITY_PROTOCOL instead",
    "sasl.mechanism": "set TRAINWIRE_KAFKA_SASL_MECHANISM instead",
    "sasl.mechanisms": "set TRAINWIRE_KAFKA_SASL_MECHANISM instead",
    "sasl.username": "set TRAINWIRE_KAFKA_SASL_USERNAME instead",
    "sasl.password": "set TRAINWIRE_KAFKA_SASL_PASSWORD instead",
    "ssl.ca.location": "set TRAINWIRE_KAFKA_SSL_CA_LOCATION instead",
    "ssl.certificate.location": "set TRAINWIRE_KAFKA_SSL_CERTIFICATE_LOCATION instead",
    "ssl.key.location": "set TRAINWIRE_KAFKA_SSL_KEY_LOCATION instead",
    "ssl.key.password": "set TRAINWIRE_KAFKA_SSL_KEY_PASSWORD instead",
    "group.id": "trainwire names its consumer groups itself",
    "group.instance.id": "trainwire names its group members itself (trainwire consume --instance-id)",
    "enable.auto.commit": "trainwire commits offsets only once a batch is stored",
    "enable.auto.offset.store": "trainwire commits offsets only once a batch is stored",
    "enable.idempotence": "trainwire's producers are idempotent so that a retry neither loses nor reorders events",
    "acks": "trainwire's producers wait for every in-sync replica (acks=all) so that no acknowledged event is lost",
    "partitioner": "trainwire partitions by run id like the Java client (murmur2_random), so a run stays in order",
    "logger": "trainwire routes librdkafka's logs itself",
    "error_cb": "trainwire routes librdkafka's errors itself",
}
# Pass-through properties whose values are credentials: held as SecretStr, so never printed.
_SECRET_PROPERTY = re.compile(r"password|secret|passphrase|key\.pem|token|oauthbearer\.config|jaas")
_PROPERTY_NAME = re.compile(r"^[a-z][a-z0-9_.]*$")


class ClientProperties(dict):
    """The pass-through table: a dict that hashes, as Settings must (the SDK keeps one sender per settings)."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))


def check_bootstrap(value: str) -> str:
    """`value` stripped, if librdkafka's bootstrap.servers takes it; else a ValueError saying what is expected."""
    servers = [server.strip() for server in value.strip().split(",")]
    for server in servers:
        match = _SERVER.match(server)
        if not match:  # shown redacted: a pasted URL may carry a password
            raise ValueError(f"expected [PROTOCOL://]host[:port][,…] (IPv6 in brackets), got {redact_text(value)!r}")
        if match["proto"] and match["proto"].upper() not in SECURITY_PROTOCOLS:
            raise ValueError(f"{redact_text(server)!r}: unknown protocol (one of {', '.join(SECURITY_PROTOCOLS)})")
        if match["port"] is not None and not 1 <= int(match["port"]) <= 65535:
            raise ValueError(f"{server!r}: expected host:port with a port in 1…65535")
    return ",".join(servers)


def check_pass_through(properties: dict[str, Any]) -> ClientProperties:
    """The pass-through table, refusing what trainwire owns (naming the key) and hiding credential values."""
    checked = ClientProperties()
    for key, value in properties.items():
        if key in OWNED_PROPERTIES:
            raise ValueError(f"{key!r} cannot be passed through: {OWNED_PROPERTIES[key]}")
        if not _PROPERTY_NAME.match(key):
            raise ValueError(f"{key!r} is not a librdkafka property name (lower case, dot-separated)")
        secret = _SECRET_PROPERTY.search(key) and not isinstance(value, SecretStr)
        checked[key] = SecretStr(str(value)) if secret else value
    return checked


def flatten_kafka_table(data: dict[str, Any]) -> dict[str, Any]:
    """The config file's `[kafka]` table as the flat keys Settings has: bootstrap → kafka, x → kafka_x."""
    table = data.get("kafka")
    if not isinstance(table, dict):
        return data
    flat = {k: v for k, v in data.items() if k != "kafka"}
    for key, value in table.items():
        name = "kafka" if key == "bootstrap" else f"kafka_{key}"
        if name in flat:
            raise ValueError(f"kafka.{key} and {name} are both set: keep one")
        flat[name] = value
    return flat


def table_key(field: str) -> str:
    """Where `field` is written in the config file's `[kafka]` table: kafka_sasl_password → kafka.sasl_password."""
    return "kafka.bootstrap" if field == "kafka" else f"kafka.{field.removeprefix('kafka_')}"
