"""The pipeline on the secured broker of infra/kafka/up --secure: SASL_SSL with SCRAM-SHA-512, one principal per
component, ACLs that let each do only its part."""

from __future__ import annotations

import gc
import importlib.util
import math
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from confluent_kafka import KafkaError, Producer

from tests.conftest import ROOT
from tests.integration.kafka_fixtures import SecureKafka, secure_kafka  # noqa: F401
from trainwire.consumers.alerting.service import ALERTS_GROUP, build_alerting, run_alerting
from trainwire.consumers.alerting.stop_switch import stop_command
from trainwire.consumers.service import INGEST_GROUP
from trainwire.infra.config import Settings
from trainwire.infra.log.kafka_client import client_properties
from trainwire.infra.log.topics import ALERTS, CONTROL, DEAD_LETTERS, EVENTS, GPU
from trainwire.infra.store import connect_store
from trainwire.infra.store.read import StoreReader
from trainwire.producers import TrainingStopped, init
from trainwire.schemas import Alert, Step, encode

NAN_FROM_STEP = 5
STEPS = 10
FAILS_WITHIN_SECONDS = 30.0


def consume(secure: SecureKafka, home: Path, *args: str, **variables: str) -> subprocess.CompletedProcess:
    """`trainwire consume` as the ingest principal, from the config file up --secure wrote, then `variables`."""
    return subprocess.run([sys.executable, "-m", "trainwire", "consume", *args],
                          env=secure.cli_env("ingest", home, **variables), capture_output=True, text=True, timeout=120)


def test_up_grants_the_topics_and_groups_trainwire_uses():
    spec = importlib.util.spec_from_file_location("grant", ROOT / "infra/kafka/grant.py")
    grant = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(grant)
    assert set(grant.TOPICS) == {EVENTS, GPU, ALERTS, CONTROL, DEAD_LETTERS}
    assert (grant.INGEST_GROUP, grant.ALERTS_GROUP) == (INGEST_GROUP, ALERTS_GROUP)


class StoppableRun:
    """An opted-in SDK run as the producer principal: steps 1..STEPS, NaN from NAN_FROM_STEP, then one long step
    (checking for a stop command) in a thread of its own, as a training loop would."""

    def __init__(self, settings):
        self.run = init("secure-e2e", settings=settings, sample_gpus=False, stop_on_block=True)
        self.stopped: TrainingStopped | None = None
        self._thread = threading.Thread(target=self._train, daemon=True)
        self._thread.start()

    def _train(self) -> None:
        try:
            with self.run:
                for step in range(1, STEPS + 1):
                    self.run.log_step(step, loss=math.nan if step >= NAN_FROM_STEP else 1.0 / step)
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    self.run.check_stop()
                    time.sleep(0.05)
        except TrainingStopped as stopped:
            self.stopped = stopped

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


@pytest.mark.kafka
def test_a_run_over_sasl_ssl_is_stored_once_alerted_and_stopped(secure_kafka, tmp_path):
    home = tmp_path / "home"
    training = StoppableRun(secure_kafka.settings("producer", home))
    time.sleep(1.0)  # the SDK sends what it gathered every 50 ms

    first = consume(secure_kafka, home, "--drain", "--idle-seconds", "3")  # stores the steps, publishes the alert
    assert first.returncode == 0, first.stderr[-3000:]

    # the alert consumer, as the alerting principal: reads the alert, tells the opted-in run to stop
    alerting = build_alerting(secure_kafka.settings("alerting", home))
    stop = threading.Event()
    pager = threading.Thread(target=run_alerting, args=(alerting, stop))
    pager.start()
    try:
        training.join(60)
    finally:
        stop.set()
        pager.join(30)
        del alerting
        gc.collect()  # the embedded store, which the next consume opens, is one process's at a time
    assert training.stopped is not None, "the stop command did not reach the run"
    assert training.stopped.reason.startswith("loss_not_finite: ")

    last = consume(secure_kafka, home, "--drain", "--idle-seconds", "3")  # the run's end
    assert last.returncode == 0, last.stderr[-3000:]
    client = connect_store(Settings(home=home).store_dsn)
    try:
        reader = StoreReader(client)
        run_id = training.run.run_id
        assert reader.events_stored([run_id]) == training.run.events_emitted
        raw = client.query("SELECT count() FROM steps WHERE run_id = {r:String}", parameters={"r": run_id})
        assert raw.result_rows[0][0] == STEPS  # without FINAL: no step stored twice
        assert reader.run_summary(run_id)["status"] == "stopped"
        assert [a["rule"] for a in reader.incidents([run_id])] == ["loss_not_finite"]
    finally:
        client.close()


@pytest.mark.kafka
@pytest.mark.parametrize("wrong", ["password", "ca"])
def test_consume_with_a_wrong_password_or_ca_fails_at_start_in_one_line(secure_kafka, tmp_path, wrong):
    if wrong == "password":
        variables = {"TRAINWIRE_KAFKA_SASL_PASSWORD": "not-" + secure_kafka.password("ingest")}
        said = re.compile(r"(?i)auth|sasl|password|credential")
    else:  # a CA of its own, which never signed the broker's certificate
        subprocess.run([str(ROOT / "infra/kafka/certs"), str(tmp_path / "other-ca")], check=True, timeout=60)
        variables = {"TRAINWIRE_KAFKA_SSL_CA_LOCATION": str(tmp_path / "other-ca" / "ca.pem")}
        said = re.compile(r"(?i)certificate|ssl|tls")

    started = time.monotonic()
    result = consume(secure_kafka, tmp_path / "home", **variables)  # not --drain: connected, it would not exit
    took = time.monotonic() - started

    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0
    assert len(lines) == 1, result.stderr[-3000:]  # no librdkafka lines, no traceback
    assert said.search(lines[0]), lines[0]
    assert secure_kafka.password("ingest") not in result.stderr + result.stdout
    assert took < FAILS_WITHIN_SECONDS


@pytest.mark.kafka
def test_the_producer_principal_cannot_write_alerts_or_stop_commands(secure_kafka, tmp_path):
    settings = secure_kafka.settings("producer", tmp_path / "home")
    forged = Alert(run_id="r-forged", experiment="it", rule="loss_not_finite", severity="block", state="firing",
                   dedup_key="r-forged/loss_not_finite")
    writes = {EVENTS: encode(Step(run_id="r-forged", experiment="it", seq=1, step=1, loss=1.0)),
              ALERTS: encode(forged), CONTROL: encode(stop_command(forged))}
    delivered: dict[str, KafkaError | None] = {}
    for name, value in writes.items():
        producer = Producer(client_properties(settings) | {"acks": "all", "enable.idempotence": True})
        producer.produce(settings.topic(name), value, key=b"r-forged",
                         on_delivery=lambda err, _msg, name=name: delivered.__setitem__(name, err))
        assert producer.flush(30) == 0
    assert delivered[EVENTS] is None  # the same principal and client may write telemetry
    for name in (ALERTS, CONTROL):
        assert delivered[name] is not None and delivered[name].code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
