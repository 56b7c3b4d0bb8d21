"""Make trainwire's topics and grant each principal only what it needs, as the admin principal of a secured broker;
then write each principal's client settings (run by infra/kafka/up --secure, idempotent).

Standalone on purpose (confluent-kafka only, no trainwire import): the names below are trainwire's topics and
consumer groups, checked against the package by tests/integration/test_kafka_security.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import (AclBinding, AclOperation, AclPermissionType, AdminClient, NewTopic,
                                   ResourcePatternType, ResourceType)

TOPICS = ("events", "gpu", "alerts", "control", "dead-letters")
AUDIT_HEAD = "audit-head"  # compacted, one partition (trainwire.infra.store.audit_anchor.HEAD_TOPIC)
INGEST_GROUP = "ingest"
ALERTS_GROUP = "alerts-pager"
RUN_CONTROL_GROUPS = "run-control-"  # each run's stop listener names a group of its own under this
MECHANISM = "SCRAM-SHA-512"
WHAT_EACH_DOES = {
    "admin": "super user: topics, ACLs, everything",
    "producer": "SDK runs: write events and gpu, read control",
    "ingest": "trainwire consume: read events and gpu, write alerts and dead-letters",
    "alerting": "trainwire alerts: read alerts, the only writer of control",
}

READ, WRITE, DESCRIBE = AclOperation.READ, AclOperation.WRITE, AclOperation.DESCRIBE


def grants(prefix: str) -> list[tuple[str, ResourceType, str, ResourcePatternType, AclOperation]]:
    """(principal, resource type, name, pattern, operation). READ and WRITE imply DESCRIBE."""
    topic, group = ResourceType.TOPIC, ResourceType.GROUP
    exact, starting = ResourcePatternType.LITERAL, ResourcePatternType.PREFIXED
    return [
        ("producer", topic, f"{prefix}events", exact, WRITE),
        ("producer", topic, f"{prefix}gpu", exact, WRITE),
        ("producer", topic, f"{prefix}control", exact, READ),
        ("producer", group, f"{prefix}{RUN_CONTROL_GROUPS}", starting, READ),
        ("ingest", topic, f"{prefix}events", exact, READ),
        ("ingest", topic, f"{prefix}gpu", exact, READ),
        ("ingest", group, f"{prefix}{INGEST_GROUP}", exact, READ),
        ("ingest", topic, f"{prefix}alerts", exact, WRITE),
        ("ingest", topic, f"{prefix}dead-letters", exact, WRITE),
        ("ingest", topic, f"{prefix}control", exact, DESCRIBE),  # consume checks that the topics it names exist
        ("alerting", topic, f"{prefix}alerts", exact, READ),
        ("alerting", group, f"{prefix}{ALERTS_GROUP}", exact, READ),
        ("alerting", topic, f"{prefix}control", exact, WRITE),
        # the heads of the audit log (docs/governance.md): every process that appends to the log publishes them
        ("ingest", topic, f"{prefix}{AUDIT_HEAD}", exact, WRITE),
        ("alerting", topic, f"{prefix}{AUDIT_HEAD}", exact, WRITE),
    ]


def client(bootstrap: str, ca: str, user: str, password: str) -> dict:
    return {"bootstrap.servers": bootstrap, "security.protocol": "SASL_SSL", "sasl.mechanism": MECHANISM,
            "sasl.username": user, "sasl.password": password, "ssl.ca.location": ca}


def retried(what: str, action, seconds: float = 60.0):
    """The broker answers on its port a moment before its metadata (credentials, ACLs) is loaded."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return action()
        except KafkaException as err:
            if time.monotonic() > deadline:
                raise SystemExit(f"infra/kafka/grant.py: {what} failed: {err}") from err
            time.sleep(1.0)


def make_topics(admin: AdminClient, prefix: str, partitions: int) -> None:
    def create() -> None:
        # replication factor -1: the broker's default.replication.factor (min.insync.replicas is its default too)
        topics = [NewTopic(f"{prefix}{t}", num_partitions=partitions, replication_factor=-1) for t in TOPICS]
        topics.append(NewTopic(f"{prefix}{AUDIT_HEAD}", num_partitions=1, replication_factor=-1,
                               config={"cleanup.policy": "compact"}))
        futures = admin.create_topics(topics, request_timeout=15)
        for future in futures.values():
            try:
                future.result()
            except KafkaException as err:
                if err.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
    retried("creating the topics", create)


def grant(admin: AdminClient, prefix: str) -> None:
    bindings = [AclBinding(kind, name, pattern, f"User:{who}", "*", operation, AclPermissionType.ALLOW)
                for who, kind, name, pattern, operation in grants(prefix)]

    def create() -> None:
        for future in admin.create_acls(bindings, request_timeout=15).values():
            future.result()
    retried("creating the ACLs", create)


def wait_until_effective(bootstrap: str, ca: str, passwords: dict[str, str], prefix: str,
                         seconds: float = 30.0) -> None:
    """The broker applies new ACLs a moment (~0.5 s) after the controller has them, and a producer that meets a
    topic it may not describe fails its messages for good: return only once each principal sees its topics."""
    topics: dict[str, set[str]] = {}
    for who, kind, name, _, _ in grants(prefix):
        if kind == ResourceType.TOPIC:
            topics.setdefault(who, set()).add(name)
    deadline = time.monotonic() + seconds
    for who, names in sorted(topics.items()):
        admin = AdminClient(client(bootstrap, ca, who, passwords[who]))
        for topic in sorted(names):
            while (error := retried("reading the metadata", lambda: admin.list_topics(topic, timeout=10))
                   .topics[topic].error) is not None:
                if time.monotonic() > deadline:
                    raise SystemExit(f"infra/kafka/grant.py: {who} cannot see {topic} after its ACLs: {error.str()}")
                time.sleep(0.1)


def settings_of(user: str, bootstrap: str, ca: str, prefix: str) -> dict[str, str]:
    return {"kafka": bootstrap, "kafka_security_protocol": "SASL_SSL", "kafka_sasl_mechanism": MECHANISM,
            "kafka_sasl_username": user, "kafka_ssl_ca_location": ca, "topic_prefix": prefix}


def toml_text(settings: dict[str, str], password: str) -> str:
    def quoted(value: str) -> str:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'

    kafka = {("bootstrap" if k == "kafka" else k.removeprefix("kafka_")): v
             for k, v in settings.items() if k.startswith("kafka")}
    kafka["sasl_password"] = password
    return "\n".join([f"topic_prefix = {quoted(settings['topic_prefix'])}", "", "[kafka]",
                      *(f"{key} = {quoted(value)}" for key, value in kafka.items()), ""])


def write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.chmod(path, 0o600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--passwords", type=Path, required=True, help="name=password lines")
    parser.add_argument("--topic-prefix", default="trainwire.")
    parser.add_argument("--partitions", type=int, default=int(os.environ.get("TRAINWIRE_KAFKA_PARTITIONS", 8)))
    parser.add_argument("--out", type=Path, required=True, help="where the per-principal config files go")
    parser.add_argument("--print-secrets", action="store_true")
    args = parser.parse_args()
    passwords = dict(line.split("=", 1) for line in args.passwords.read_text().split())

    admin = AdminClient(client(args.bootstrap, args.ca, "admin", passwords["admin"]))
    make_topics(admin, args.topic_prefix, args.partitions)
    grant(admin, args.topic_prefix)
    wait_until_effective(args.bootstrap, args.ca, passwords, args.topic_prefix)

    print(f"# client settings per principal; passwords are in the 0600 files named"
          f"{'' if args.print_secrets else ' (--print-secrets prints them)'}")
    for user, what in WHAT_EACH_DOES.items():
        settings = settings_of(user, args.bootstrap, args.ca, args.topic_prefix)
        path = args.out / f"{user}.toml"
        write_private(path, toml_text(settings, passwords[user]))
        print(f"# {user} ({what}); as a config file: TRAINWIRE_CONFIG={path}")
        for key, value in settings.items():
            print(f"TRAINWIRE_{key.upper()}={value}")
        if args.print_secrets:
            print(f"TRAINWIRE_KAFKA_SASL_PASSWORD={passwords[user]}")
        else:
            print(f"# TRAINWIRE_KAFKA_SASL_PASSWORD: in {path}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
