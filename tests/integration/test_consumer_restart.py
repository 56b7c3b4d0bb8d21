"""`trainwire consume` after a crash: a SIGKILLed consumer's restart resumes within seconds (static group
membership: it rejoins under the same group.instance.id), and two consumers on one host never share an id.

Progress is read from the broker: ingest commits an offset only after the batch holding it is inserted, so the
ingest group's committed offsets say what is stored while the consumer runs (chdb serves one process per data
directory). The stored rows themselves are read once the consumer has exited.
"""

import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from confluent_kafka.admin import AdminClient

from tests.integration.test_consumer_group import uncommitted
from trainwire.consumers.service import INGEST_GROUP
from trainwire.infra.config import Settings
from trainwire.infra.log import ensure_topics, open_consumer, open_producer
from trainwire.infra.log.instance import ConsumerSlot
from trainwire.infra.log.topics import EVENTS, GPU, topic_for
from trainwire.infra.store import connect_store
from trainwire.schemas import GpuSample, Step, encode

RESUME_SECONDS = 10.0
HOLD_A_SLOT = """
import sys, time
from pathlib import Path
from trainwire.infra.log.instance import ConsumerSlot
slot = ConsumerSlot(Path(sys.argv[1]), "ingest")
print(slot.index, flush=True)
time.sleep(600)
"""


def start_consumer(settings: Settings, store: str, log_path, *flags: str) -> subprocess.Popen:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TRAINWIRE_")},
           "TRAINWIRE_KAFKA": settings.kafka, "TRAINWIRE_TOPIC_PREFIX": settings.topic_prefix,
           "TRAINWIRE_STORE": store, "TRAINWIRE_HOME": str(settings.home), "TRAINWIRE_BATCH_MAX_SECONDS": "0.2",
           "TRAINWIRE_HEARTBEAT_SECONDS": "600"}
    with open(log_path, "a") as log:
        return subprocess.Popen([sys.executable, "-m", "trainwire", "consume", "--json", *flags], env=env, stdout=log,
                                stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen, log_path) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, log_path.read_text()[-3000:]


def send_events(settings: Settings, runs: list[str], first_seq: int, count: int) -> set[str]:
    """`count` steps and GPU samples of each run (the two topics may go to different members); their event ids."""
    producer = open_producer(settings)
    ids = set()
    for seq in range(first_seq, first_seq + count):
        for run in runs:
            for event in (Step(run_id=run, experiment="restart", seq=seq, step=seq, loss=10.0 / (seq + 1)),
                          GpuSample(run_id=run, experiment="restart", seq=seq, gpu_index=0, gpu_uuid="GPU-0")):
                producer.append(settings.topic(topic_for(event.kind)), run.encode(), encode(event))
                ids.add(event.event_id)
    assert producer.flush(30) == 0
    producer.close()
    return ids


def seconds_until_stored(settings: Settings, since: float, timeout: float) -> float | None:
    """Seconds from `since` until every record is committed, or None if that took longer than `timeout`."""
    while time.monotonic() - since < timeout:
        if uncommitted(settings, [settings.topic(EVENTS), settings.topic(GPU)]) == 0:
            return time.monotonic() - since
        time.sleep(0.2)
    return None


def stored_ids(store: str) -> list[str]:
    client = connect_store(store)
    ids = [row[0] for table in ("steps", "gpu_samples")
           for row in client.query(f"SELECT event_id FROM {table} FINAL").result_rows]
    client.close()
    return ids


def group_members(settings: Settings) -> list:
    admin = AdminClient({"bootstrap.servers": settings.kafka, "logger": logging.getLogger("librdkafka")})
    (description,) = [f.result() for f in admin.describe_consumer_groups(
        [settings.topic(INGEST_GROUP)], request_timeout=10).values()]
    return description.members


def test_a_restarted_process_takes_back_the_slot_of_its_killed_predecessor(tmp_path):
    def hold_a_slot() -> tuple[subprocess.Popen, int]:
        proc = subprocess.Popen([sys.executable, "-c", HOLD_A_SLOT, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        return proc, int(proc.stdout.readline())

    holders = []
    try:
        holders = [hold_a_slot(), hold_a_slot()]
        assert [slot for _, slot in holders] == [0, 1]
        holders[0][0].kill()  # SIGKILL: the kernel lets go of its lock
        holders[0][0].wait(10)
        holders.append(hold_a_slot())
        assert holders[-1][1] == 0, "the restart rejoins as the member it was"

        here = ConsumerSlot(tmp_path, "ingest")
        assert here.index == 2 and ConsumerSlot(tmp_path, "alerting").index == 0  # per group
        here.release()
        assert ConsumerSlot(tmp_path, "ingest").index == 2, "a released slot is free again"
    finally:
        for proc, _ in holders:
            proc.kill()
            proc.wait(10)


def test_an_explicit_instance_id_must_be_one_the_broker_takes(tmp_path):
    settings = Settings(home=tmp_path, kafka="127.0.0.1:9")  # refused before any connection
    with pytest.raises(ValueError, match="invalid consumer instance id"):
        open_consumer(settings, "ingest", ["t"], instance_id="node 1/ingest")


@pytest.fixture
def settings(kafka_settings):
    ensure_topics(kafka_settings, [kafka_settings.topic(t) for t in (EVENTS, GPU)], partitions=8)
    return kafka_settings


@pytest.mark.kafka
def test_a_sigkilled_consumer_restarts_and_stores_within_seconds(settings, tmp_path):
    store, log_path = f"chdb://{tmp_path / 'store'}", tmp_path / "consume.log"
    runs = [f"run-{i}" for i in range(8)]
    consumer = start_consumer(settings, store, log_path)
    try:
        before = send_events(settings, runs, first_seq=0, count=50)
        assert seconds_until_stored(settings, time.monotonic(), 120) is not None, log_path.read_text()[-3000:]
        consumer.send_signal(signal.SIGKILL)  # no goodbye: the broker still counts it a member of the group
        consumer.wait(10)

        consumer = start_consumer(settings, store, log_path)
        restarted = time.monotonic()
        after = send_events(settings, runs, first_seq=50, count=50)
        took = seconds_until_stored(settings, restarted, RESUME_SECONDS)
        assert took is not None, (f"the restarted consumer stored nothing new within {RESUME_SECONDS}s of its "
                                  f"start\n{log_path.read_text()[-3000:]}")
        print(f"the restarted consumer stored every new event {took:.1f}s after its start")
        stop(consumer, log_path)
    finally:
        if consumer.poll() is None:
            consumer.kill()

    stored = stored_ids(store)
    assert set(stored) == before | after and len(stored) == len(before | after)


@pytest.mark.kafka
def test_two_consumers_on_one_host_get_distinct_instance_ids_and_both_consume(settings, tmp_path):
    stores = {name: f"chdb://{tmp_path / name}" for name in ("a", "b")}
    logs = {name: tmp_path / f"{name}.log" for name in stores}
    consumers = {name: start_consumer(settings, stores[name], logs[name]) for name in stores}
    try:
        deadline, members = time.monotonic() + 60, []
        while time.monotonic() < deadline:
            members = group_members(settings)
            if len(members) == 2 and all(m.assignment.topic_partitions for m in members):
                break
            time.sleep(0.5)
        ids = sorted(m.group_instance_id or "" for m in members)
        group = settings.topic(INGEST_GROUP)
        assert ids == [f"{socket.gethostname()}-{group}-0", f"{socket.gethostname()}-{group}-1"], members

        produced = send_events(settings, [f"run-{i}" for i in range(32)], first_seq=0, count=20)
        assert seconds_until_stored(settings, time.monotonic(), 60) is not None
        for name, proc in consumers.items():
            stop(proc, logs[name])
    finally:
        for proc in consumers.values():
            if proc.poll() is None:
                proc.kill()

    stored = {name: stored_ids(store) for name, store in stores.items()}
    assert stored["a"] and stored["b"], "both consumers stored a share"
    assert set(stored["a"]) | set(stored["b"]) == produced
    assert set(stored["a"]).isdisjoint(stored["b"])


@pytest.mark.kafka
def test_a_consumer_fenced_by_a_duplicate_instance_id_stops_with_one_line(settings, tmp_path):
    """Two consumers given the same --instance-id: the broker fences the first out; it must stop with one line
    and a non-zero status, not go silent or retry for ever."""
    logs = {name: tmp_path / f"{name}.log" for name in ("first", "second")}
    first = start_consumer(settings, f"chdb://{tmp_path / 'a'}", logs["first"], "--instance-id", "ingest-dup")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(m.assignment.topic_partitions for m in group_members(settings)):
            time.sleep(0.5)
        second = start_consumer(settings, f"chdb://{tmp_path / 'b'}", logs["second"], "--instance-id", "ingest-dup")
        deadline = time.monotonic() + 120  # each rejoins a few times, fencing the other, before one gives up
        while time.monotonic() < deadline and first.poll() is None and second.poll() is None:
            time.sleep(0.5)
        stopped, stopped_name = (first, "first") if first.poll() is not None else (second, "second")
        assert stopped.returncode == 4, {name: log.read_text()[-3000:] for name, log in logs.items()}
        output = logs[stopped_name].read_text()
        assert "same instance id" in output and "ingest-dup" in output and "Traceback" not in output
        for proc, name in ((first, "first"), (second, "second")):
            if proc is not stopped:
                stop(proc, logs[name])
    finally:
        for proc in (first, locals().get("second")):
            if proc is not None and proc.poll() is None:
                proc.kill()
