"""Kafka client settings against the real (PLAINTEXT) broker: every client takes the configured properties, topics are
made as the settings say, and a client that cannot connect stops at start with one line (docs/kafka.md)."""

import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource
from pydantic import SecretStr

from trainwire.infra.config import ConfigError, Settings
from trainwire.infra.log import TransportUnavailableError, check_transport, ensure_topics, open_consumer
from trainwire.infra.log.kafka import KafkaLogConsumer, KafkaLogProducer, KafkaLogTail
from trainwire.infra.log.kafka_admin import create_topics
from trainwire.infra.log.spool import SpoolingProducer

pytestmark = pytest.mark.kafka
PASSWORD = "Sup3r-secret-pw"
EXIT_TRANSPORT_UNAVAILABLE = 5


def closed_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def test_a_pass_through_property_reaches_every_kind_of_client(kafka_settings):
    """A value librdkafka refuses is refused by each client as it is built: so each was built with the table."""
    bad = kafka_settings.model_copy(update={"kafka_client": {"socket.timeout.ms": "soon"}})
    builders = {
        "producer": lambda: KafkaLogProducer(bad),
        "consumer": lambda: KafkaLogConsumer(bad, "g", ["t"]),
        "tail (stop-switch listener)": lambda: KafkaLogTail(bad, "t", 0, "g"),
        "admin (topics)": lambda: create_topics(bad, ["t"]),
    }
    for name, build in builders.items():
        with pytest.raises(KafkaException, match="socket.timeout.ms"):
            build()
            pytest.fail(f"the {name} was built without the pass-through table")
    with pytest.raises(TransportUnavailableError, match="socket.timeout.ms.*TRAINWIRE_KAFKA_CLIENT"):
        check_transport(bad)


def test_the_sdk_spools_with_one_error_line_when_librdkafka_refuses_its_settings(kafka_settings, caplog):
    bad = kafka_settings.model_copy(update={"kafka_client": {"socket.timeout.ms": "soon"}})
    with caplog.at_level(logging.ERROR, logger="trainwire"):
        producer = SpoolingProducer(bad, bad.spool_dir)
        for i in range(100):
            producer.append("t", b"run", str(i).encode())
        started = time.monotonic()
        assert producer.flush(5) == 100, "every event kept in the spool"
        assert time.monotonic() - started < 1, "nothing to wait for: no producer"
        producer.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "TRAINWIRE_KAFKA_CLIENT" in errors[0], errors
    assert list(bad.spool_dir.glob("*.db")), "the spool stays on disk for `trainwire spool replay`"


def test_a_client_id_passed_through_is_the_one_the_broker_sees(kafka_settings):
    settings = kafka_settings.model_copy(update={"kafka_client": {"client.id": "tw-probe-ingest"}})
    topic = settings.topic("probe")
    ensure_topics(settings, [topic], partitions=1)
    group = settings.topic("probe-group")
    consumer = open_consumer(settings, group, [topic])
    try:
        deadline = time.monotonic() + 30
        while not consumer.assigned() and time.monotonic() < deadline:
            consumer.poll(10, 0.2)
        admin = AdminClient({"bootstrap.servers": settings.kafka})
        (description,) = [f.result(timeout=10) for f in admin.describe_consumer_groups([group]).values()]
        assert [m.client_id for m in description.members] == ["tw-probe-ingest"]
    finally:
        consumer.close()


def test_topics_are_made_as_the_settings_say(kafka_settings):
    settings = kafka_settings.model_copy(update={"kafka_partitions": 3, "kafka_retention_hours": 2})
    topic = settings.topic(f"made-{uuid.uuid4().hex[:6]}")
    ensure_topics(settings, [topic])
    admin = AdminClient({"bootstrap.servers": settings.kafka})
    metadata = admin.list_topics(topic, timeout=10).topics[topic]
    assert len(metadata.partitions) == 3
    assert all(len(p.replicas) == 1 for p in metadata.partitions.values()), "min(3, brokers) on one broker"
    (configs,) = [f.result(timeout=10) for f in admin.describe_configs([ConfigResource("topic", topic)]).values()]
    assert configs["retention.ms"].value == str(2 * 3600 * 1000)
    assert configs["min.insync.replicas"].value == "1", "min(2, RF)"
    ensure_topics(settings, [topic])  # again: nothing to do, nothing said


def test_a_replication_factor_above_the_broker_count_is_refused_and_nothing_made(kafka_settings):
    settings = kafka_settings.model_copy(update={"kafka_replication_factor": 3})
    topic = settings.topic(f"refused-{uuid.uuid4().hex[:6]}")
    with pytest.raises(ConfigError, match="TRAINWIRE_KAFKA_REPLICATION_FACTOR is 3 but .* 1 broker"):
        ensure_topics(settings, [topic])
    admin = AdminClient({"bootstrap.servers": settings.kafka})
    assert topic not in admin.list_topics(timeout=10).topics, "never created under-replicated"


def test_the_check_passes_against_the_broker(kafka_settings):
    check_transport(kafka_settings)


def trainwire(args: list[str], home: Path, bootstrap: str, **variables: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINWIRE_")}
    env |= {"TRAINWIRE_HOME": str(home), "TRAINWIRE_KAFKA": bootstrap, **variables}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "trainwire", *args], env=env, capture_output=True, text=True,
                            timeout=120)
    return result, time.monotonic() - started


SCRAM_OVER_TLS = {"TRAINWIRE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "TRAINWIRE_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
                  "TRAINWIRE_KAFKA_SASL_USERNAME": "ingest", "TRAINWIRE_KAFKA_SASL_PASSWORD": PASSWORD}


def assert_one_line(result: subprocess.CompletedProcess, says: str) -> None:
    assert result.returncode == EXIT_TRANSPORT_UNAVAILABLE, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("trainwire: error: cannot connect to Kafka") and says in lines[0], lines[0]
    assert PASSWORD not in result.stderr + result.stdout and "Traceback" not in result.stderr


@pytest.mark.parametrize("command", [["consume"], ["alerts"], ["up", "--no-dashboard"], ["spool", "replay"]])
def test_sasl_ssl_pointed_at_a_plaintext_listener_stops_each_command_with_one_line(kafka_bootstrap, tmp_path,
                                                                                   command):
    result, seconds = trainwire(command, tmp_path / "home", kafka_bootstrap, **SCRAM_OVER_TLS)
    assert_one_line(result, "TLS handshake with 127.0.0.1:")
    assert "TRAINWIRE_KAFKA_SECURITY_PROTOCOL" in result.stderr
    assert seconds < 20, "the cause is known at the first handshake: no need to wait out the check"


def test_a_sasl_mechanism_the_listener_does_not_offer_is_named(kafka_bootstrap, tmp_path):
    variables = SCRAM_OVER_TLS | {"TRAINWIRE_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT"}
    result, _ = trainwire(["consume"], tmp_path / "home", kafka_bootstrap, **variables)
    assert_one_line(result, "does not offer SASL SCRAM-SHA-512")


def test_an_unreachable_broker_stops_consume_with_one_line_within_the_check(tmp_path):
    bootstrap = closed_port()
    result, seconds = trainwire(["consume"], tmp_path / "home", bootstrap)
    assert_one_line(result, f"cannot reach {bootstrap}")
    assert seconds < 30, "the check is bounded (10 s)"


def test_the_sdk_with_credentials_the_broker_refuses_keeps_spooling_and_says_so_once(kafka_settings, caplog):
    refused = kafka_settings.model_copy(update={
        "kafka_security_protocol": "SASL_PLAINTEXT", "kafka_sasl_mechanism": "SCRAM-SHA-512",
        "kafka_sasl_username": "trainer", "kafka_sasl_password": SecretStr(PASSWORD)})
    with caplog.at_level(logging.WARNING, logger="trainwire"):
        producer = SpoolingProducer(refused, refused.spool_dir)
        started = time.monotonic()
        for i in range(1000):
            producer.append(refused.topic("events"), b"run", str(i).encode())
        assert time.monotonic() - started < 0.5, "appending never waits for the broker"
        assert producer.flush(3) == 1000, "every event kept in the spool"
        producer.close()
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    refusals = [line for line in lines if "does not offer SASL SCRAM-SHA-512" in line]
    assert len(refusals) == 1, lines
    assert all(PASSWORD not in line for line in lines)
