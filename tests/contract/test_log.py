"""One contract, run against both transports: the embedded SQLite log and the real Kafka broker."""

import logging
import socket
import subprocess
import sys
import time
import uuid
from contextlib import closing

import pytest
from confluent_kafka import KafkaError, KafkaException

from trainwire.infra.config import Settings
from trainwire.infra.log import TransportError, ensure_topics, open_consumer, open_producer
from trainwire.infra.log.base import FatalTransportError, next_positions
from trainwire.infra.log.kafka import KafkaLogConsumer, KafkaLogProducer
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


def poll_until_assigned(consumer, timeout: float = 30.0) -> list:
    """Polls one record at a time until the group has given the consumer its partitions; returns what it read."""
    records, deadline = [], time.monotonic() + timeout
    while not consumer.assigned() and time.monotonic() < deadline:
        records += consumer.poll(1, 0.2)
    assert consumer.assigned(), "no partitions assigned"
    return records


def eventually(read, done=bool, timeout: float = 15.0):
    """`read()` once `done` with its answer (the transport's cached view catches up), else its last answer."""
    deadline = time.monotonic() + timeout
    while not done(answer := read()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return answer


def cached_lag(consumer, timeout: float = 10.0) -> int | None:
    """lag(fresh=False) once the transport has heard from every partition (it is unknown until then)."""
    return eventually(lambda: consumer.lag(fresh=False), lambda lag: lag is not None, timeout)


def test_lag_is_unknown_until_partitions_are_assigned(any_settings):
    topic, group = any_settings.topic("assigned"), any_settings.topic("g")
    ensure_topics(any_settings, [topic], partitions=4)
    produce(any_settings, topic, [(f"run-{i % 7}".encode(), str(i).encode()) for i in range(50)])

    with closing(open_consumer(any_settings, group, [topic])) as consumer:
        if not consumer.assigned():  # Kafka: the group assigns partitions inside poll; 50 pending is not 0 pending
            assert consumer.lag() is None and consumer.lag(fresh=False) is None
        read = poll_until_assigned(consumer)
        assert consumer.lag() == 50 - len(read)
        assert cached_lag(consumer) == 50 - len(read)
        read += poll_all(consumer, 20 - len(read))
        consumer.commit(next_positions(read[:20]))

    # a new member resumes at the commit: before it has read anything, its lag counts from there, not from the
    # start of each partition
    with closing(open_consumer(any_settings, group, [topic])) as resumed:
        read = poll_until_assigned(resumed)
        assert resumed.lag() == 30 - len(read)
        assert cached_lag(resumed) == 30 - len(read)


def test_behind_names_the_partitions_holding_records_not_polled_yet(any_settings):
    """What the stall detector asks each second: a run on such a partition is silent only to this consumer."""
    topic, group = any_settings.topic("behind"), any_settings.topic("g")
    ensure_topics(any_settings, [topic], partitions=4)
    produce(any_settings, topic, [(f"run-{i % 8}".encode(), str(i).encode()) for i in range(40)])
    with closing(open_consumer(any_settings, group, [topic])) as consumer:
        assert len(poll_all(consumer, 40)) == 40
        assert eventually(lambda: consumer.behind() == set())
        produce(any_settings, topic, [(b"run-3", str(i).encode()) for i in range(5)])
        waiting = eventually(consumer.behind)
        new = poll_all(consumer, 5)
        assert waiting == {(r.topic, r.partition) for r in new} and len(waiting) == 1
        assert eventually(lambda: consumer.behind() == set())


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
    stranded = SpoolingProducer(Settings(kafka=nowhere), kafka_settings.spool_dir)
    topic = kafka_settings.topic("stranded")
    for i in range(100):
        stranded.append(topic, b"run", str(i).encode())
    assert stranded.flush(0.5) == 100
    stranded.close()
    assert len(list(kafka_settings.spool_dir.glob("*.db"))) == 1, "undelivered events stay on disk"

    ensure_topics(kafka_settings, [topic])
    rescuer = SpoolingProducer(kafka_settings, kafka_settings.spool_dir)
    assert rescuer.adopted == 1 and rescuer.flush(60) == 0
    rescuer.close()
    records = poll_all(open_consumer(kafka_settings, kafka_settings.topic("g"), [topic]), 100)
    assert [int(r.value) for r in records] == list(range(100))
    assert not list(kafka_settings.spool_dir.glob("*.db"))


class FailingClient:
    """The real librdkafka consumer, except that `method` raises what librdkafka raises when the group coordinator
    does not answer in time (`committed()` after a session loss, for one)."""

    def __init__(self, real, method: str):
        self._real, self._method = real, method

    def __getattr__(self, name: str):
        if name == self._method:
            def fail(*_args, **_kwargs):
                raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "injected: coordinator did not answer"))
            return fail
        return getattr(self._real, name)


@pytest.mark.kafka
def test_librdkafka_errors_reach_the_caller_as_transport_errors(kafka_settings):
    topic = kafka_settings.topic("failing")
    ensure_topics(kafka_settings, [topic], partitions=2)
    produce(kafka_settings, topic, [(b"k", str(i).encode()) for i in range(50)])
    consumer = open_consumer(kafka_settings, kafka_settings.topic("g"), [topic])
    real = consumer._consumer  # noqa: SLF001 - the fault is injected under the transport, into the real client
    try:
        read, deadline = poll_until_assigned(consumer), time.monotonic() + 30
        while len(read) < 2 and time.monotonic() < deadline:  # one at a time: poll needs more left to read
            read += consumer.poll(1, 0.5)
        raising = {"committed": consumer.rewind, "seek": consumer.rewind, "assignment": consumer.rewind,
                   "commit": lambda: consumer.commit(next_positions(read)),
                   "poll": lambda: consumer.poll(10, 0.5), "consume": lambda: consumer.poll(10, 0.5)}
        for method, call in raising.items():
            consumer._consumer = FailingClient(real, method)  # noqa: SLF001
            with pytest.raises(TransportError, match="injected") as raised:
                call()
                pytest.fail(f"a failing {method}() raised nothing")
            assert "\n" not in str(raised.value), method
        for method in ("get_watermark_offsets", "position", "assignment"):
            consumer._consumer = FailingClient(real, method)  # noqa: SLF001
            assert consumer.lag() is None and consumer.lag(fresh=False) is None, method  # a metric: unknown
        consumer._consumer = FailingClient(real, "close")  # noqa: SLF001
        consumer.close()  # leaving is best effort: an error is logged, not raised
    finally:
        real.close()


@pytest.mark.kafka
def test_a_member_fenced_once_rejoins_and_reads_again_from_its_last_commit(kafka_settings):
    """What a coordinator failover does to a static member: another join under its instance id (there, its own
    rejoin at the new coordinator) fences it. It must rejoin and carry on from the last commit, not stop."""
    topic = kafka_settings.topic("refenced")
    ensure_topics(kafka_settings, [topic], partitions=1)
    with closing(open_producer(kafka_settings)) as producer:
        for i in range(10):
            producer.append(topic, b"k", str(i).encode())
        producer.flush(10)
    group, instance = kafka_settings.topic("g"), f"self-{uuid.uuid4().hex[:6]}"
    with closing(open_consumer(kafka_settings, group, [topic], instance_id=instance)) as member:
        read = poll_until_assigned(member)
        while len(read) < 4:
            read += member.poll(4 - len(read), 0.5)
        member.commit(next_positions(read[:4]))
        with closing(open_consumer(kafka_settings, group, [topic], instance_id=instance)) as rejoin:
            poll_until_assigned(rejoin)  # the member is fenced out of the group now
        refused, deadline = None, time.monotonic() + 30
        while refused is None and time.monotonic() < deadline:
            try:
                member.poll(10, 0.2)
            except TransportError as err:
                refused = err
        assert refused is not None and not isinstance(refused, FatalTransportError), refused
        assert "fenced" in str(refused) and "rejoined" in str(refused)
        member.rewind()
        again, deadline = [], time.monotonic() + 30
        while len(again) < 6 and time.monotonic() < deadline:
            again += member.poll(10, 0.2)
        assert [r.value for r in again] == [str(i).encode() for i in range(4, 10)]


@pytest.mark.kafka
def test_twin_members_fenced_again_and_again_stop_with_one_line(kafka_settings):
    """Two members under one instance id fence each other at every rejoin: after a few, one stops for good."""
    topic = kafka_settings.topic("fenced")
    ensure_topics(kafka_settings, [topic], partitions=2)
    group, instance = kafka_settings.topic("g"), f"twin-{uuid.uuid4().hex[:6]}"
    with closing(open_consumer(kafka_settings, group, [topic], instance_id=instance)) as first:
        poll_until_assigned(first)
        # a member joins the group from librdkafka's own threads as soon as it subscribes: only now
        with closing(open_consumer(kafka_settings, group, [topic], instance_id=instance)) as second:
            fatal, deadline = None, time.monotonic() + 90
            while fatal is None and time.monotonic() < deadline:
                for twin in (first, second):
                    try:
                        twin.poll(10, 0.2)
                    except FatalTransportError as err:
                        fatal, stopped = err, twin
                        break
                    except TransportError:
                        pass  # fenced, and rejoined: it fences the other in turn
            assert fatal is not None, "neither twin stopped"
            message = str(fatal)
            assert "\n" not in message and instance in message and "same instance id" in message
            with pytest.raises(FatalTransportError):  # for good: no call pretends to work after that
                stopped.rewind()
            assert not stopped.assigned() and stopped.lag() is None


def unreachable_broker() -> str:
    with socket.socket() as sock:  # a port where no broker listens
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def test_an_unreachable_broker_logs_a_few_lines_not_a_flood(caplog):
    bootstrap = unreachable_broker()
    with caplog.at_level(logging.DEBUG, logger="trainwire"):
        consumer = KafkaLogConsumer(Settings(kafka=bootstrap), "g", ["t"])
        producer = KafkaLogProducer(Settings(kafka=bootstrap))
        producer.append("t", b"k", b"v")
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            consumer.poll(10, 0.2)
            producer.flush(0.2)
        consumer.close()
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert 1 <= len(lines) <= 6, "\n".join(r.getMessage() for r in lines)
