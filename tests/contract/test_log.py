"""One contract, run against both transports: the embedded SQLite log and the real Kafka broker."""

import socket
import subprocess
import sys
import time

import pytest

from trainwire.infra.config import Settings
from trainwire.infra.log import ensure_topics, open_consumer, open_producer
from trainwire.infra.log.base import next_positions
from trainwire.infra.log.spool import SpoolingProducer


def poll_all(consumer, expected: int, timeout: float = 30.0):
    records, deadline = [], time.monotonic() + timeout
    while len(records) < expected and time.monotonic() < deadline:
        records += consumer.poll(1000, 0.5)
    return records


def produce(settings: Settings, topic: str, messages: list[tuple[bytes, bytes]]) -> None:
    producer = open_producer(settings)
    for key, value in messages:
        producer.append(topic, key, value)
    assert producer.flush(30) == 0
    producer.close()


def test_per_key_order_commit_and_resume(any_settings):
    topic = any_settings.topic("contract")
    ensure_topics(any_settings, [topic], partitions=4)
    messages = [(f"run-{i % 5}".encode(), f"{i % 5}:{i}".encode()) for i in range(500)]
    produce(any_settings, topic, messages)

    consumer = open_consumer(any_settings, any_settings.topic("g1"), [topic])
    records = poll_all(consumer, 500)
    assert len(records) == 500
    by_key: dict[bytes, list[int]] = {}
    for record in records:
        by_key.setdefault(record.key, []).append(int(record.value.split(b":")[1]))
    assert all(seq == sorted(seq) for seq in by_key.values())
    assert len({r.partition for r in records if r.key == b"run-1"}) == 1

    first_half = records[:200]
    consumer.commit(next_positions(first_half))
    consumer.close()

    # committed positions are per partition; a new member of the group resumes after them
    resumed = open_consumer(any_settings, any_settings.topic("g1"), [topic])
    rest = poll_all(resumed, 300)
    resumed.close()
    seen = {(r.partition, r.offset) for r in first_half}
    assert {(r.partition, r.offset) for r in rest}.isdisjoint(seen)
    assert len(rest) == 300

    other_group = open_consumer(any_settings, any_settings.topic("g2"), [topic])
    assert len(poll_all(other_group, 500)) == 500
    other_group.close()


WRITER = """
import sys
from trainwire.infra.config import Settings
from trainwire.infra.log import open_producer
settings, writer = Settings.model_validate_json(sys.argv[1]), int(sys.argv[2])
producer = open_producer(settings)
for i in range(300):
    producer.append(settings.topic("multi"), f"w{writer}".encode(), f"{writer}:{i}".encode())
    if i % 7 == 0:
        producer.flush(10)  # many small transactions, interleaving with the other writers
assert producer.flush(10) == 0
"""


def test_local_log_takes_several_writing_processes(local_settings):
    topic = local_settings.topic("multi")
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, local_settings.model_dump_json(), str(w)])
             for w in range(4)]
    assert [p.wait(60) for p in procs] == [0, 0, 0, 0]
    records = poll_all(open_consumer(local_settings, local_settings.topic("g"), [topic]), 1200)
    assert len(records) == 1200
    for w in range(4):
        mine = [int(r.value.split(b":")[1]) for r in records if r.key == f"w{w}".encode()]
        assert mine == list(range(300))
    assert [r.offset for r in records] == sorted(r.offset for r in records)


def test_lag_counts_unread_records(local_settings):
    topic = local_settings.topic("lag")
    produce(local_settings, topic, [(b"k", b"v")] * 10)
    consumer = open_consumer(local_settings, local_settings.topic("g"), [topic])
    assert consumer.lag() == 10
    consumer.poll(4, 1.0)
    assert consumer.lag() == 6


@pytest.mark.kafka
def test_spooled_producer_delivers_everything_in_order_and_cleans_up(kafka_settings):
    topic = kafka_settings.topic("spooled")
    ensure_topics(kafka_settings, [topic], partitions=4)
    producer = open_producer(kafka_settings, spooled=True)
    for i in range(2000):
        producer.append(topic, f"run-{i % 3}".encode(), f"{i % 3}:{i}".encode())
    assert producer.flush(60) == 0
    producer.close()
    assert not list(kafka_settings.spool_dir.glob("*.db")), "a drained spool is removed at close"

    records = poll_all(open_consumer(kafka_settings, kafka_settings.topic("g"), [topic]), 2000)
    assert len(records) == 2000
    for key in (b"run-0", b"run-1", b"run-2"):
        seq = [int(r.value.split(b":")[1]) for r in records if r.key == key]
        assert seq == sorted(seq)


@pytest.mark.kafka
def test_spool_left_by_a_producer_that_never_reached_the_broker_is_adopted(kafka_settings):
    with socket.socket() as sock:  # a port where no broker listens
        sock.bind(("127.0.0.1", 0))
        nowhere = f"127.0.0.1:{sock.getsockname()[1]}"
    stranded = SpoolingProducer(nowhere, kafka_settings.spool_dir)
    topic = kafka_settings.topic("stranded")
    for i in range(100):
        stranded.append(topic, b"run", str(i).encode())
    assert stranded.flush(0.5) == 100
    stranded.close()
    assert len(list(kafka_settings.spool_dir.glob("*.db"))) == 1, "undelivered events stay on disk"

    ensure_topics(kafka_settings, [topic])
    rescuer = SpoolingProducer(kafka_settings.kafka, kafka_settings.spool_dir)
    assert rescuer.adopted == 1 and rescuer.flush(60) == 0
    rescuer.close()
    records = poll_all(open_consumer(kafka_settings, kafka_settings.topic("g"), [topic]), 100)
    assert [int(r.value) for r in records] == list(range(100))
    assert not list(kafka_settings.spool_dir.glob("*.db"))
