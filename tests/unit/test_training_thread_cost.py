"""What telemetry costs the training thread (issue 13, item 8), asserted as behaviour, not timed: the sender and the
spool's forwarder let go of the GIL between slices of a backlog, a message in flight holds nothing the garbage
collector walks, and the installed packages are read once per process. The speed targets themselves are met in
benchmarks/callback_cost_bench.py and benchmarks/producer_bench.py."""

from __future__ import annotations

import gc
import socket
import sys
import threading
import time
from importlib import metadata
from types import SimpleNamespace

import pytest

import trainwire.producers.emitter as emitter_module
from trainwire.infra.config import Settings
from trainwire.infra.log import LogProducer
from trainwire.infra.log.spool import SpoolingProducer
from trainwire.producers import environment
from trainwire.producers.emitter import SLICE_SECONDS, YIELD_SECONDS, Emitter
from trainwire.schemas import Step, decode

APPEND_SECONDS = 0.4 * SLICE_SECONDS  # what each hand-over costs on the fake clock: three fit in a slice


class Clock:
    """The sender's clock: it moves only when the transport takes an event; sleeps are recorded, not slept."""

    def __init__(self):
        self.now = 0.0
        self.trace: list[str] = []  # "event" or "sleep", in the order the sender did them

    def time_module(self) -> SimpleNamespace:
        return SimpleNamespace(perf_counter=lambda: self.now, monotonic=time.monotonic, sleep=self.sleep)

    def sleep(self, seconds: float) -> None:
        self.trace.append("sleep" if seconds == YIELD_SECONDS else f"sleep {seconds}")


class GatedProducer(LogProducer):
    """Holds the first event until released, so that a backlog builds up behind it; then each append is a tick."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.release = threading.Event()
        self.values: list[bytes] = []

    def append(self, topic, key, value):
        self.release.wait()
        self.clock.now += APPEND_SECONDS
        self.clock.trace.append("event")
        self.values.append(value)

    def flush(self, timeout):
        return 0


def backlog(monkeypatch, events: int) -> tuple[Emitter, GatedProducer, Clock]:
    clock = Clock()
    monkeypatch.setattr(emitter_module, "time", clock.time_module())
    producer = GatedProducer(clock)
    emitter = Emitter(producer, lambda name: name, queue_size=1_000)
    for step in range(events):
        assert emitter.submit(Step, {"run_id": "r", "experiment": "e", "seq": step, "step": step})
    return emitter, producer, clock


def test_the_sender_lets_go_of_the_gil_between_slices_of_a_backlog(monkeypatch):
    emitter, producer, clock = backlog(monkeypatch, 30)
    producer.release.set()
    deadline = time.monotonic() + 10
    while len(producer.values) < 30 and time.monotonic() < deadline:
        time.sleep(0.005)
    # every event handed over once, in order, and never more than a slice's worth of them between two sleeps
    assert [decode(v).step for v in producer.values] == list(range(30))
    assert set(clock.trace) == {"event", "sleep"}
    assert max(len(run) for run in "".join("e" if what == "event" else "|" for what in clock.trace).split("|")) == 3
    emitter.close(5)
    assert emitter.sent == 30 and emitter.dropped == emitter.invalid == 0


def test_the_sender_does_not_pause_while_flush_waits_for_it(monkeypatch):
    emitter, producer, clock = backlog(monkeypatch, 30)
    flushed = threading.Thread(target=emitter.flush, args=(5,))
    flushed.start()
    while not emitter._flushing.is_set():
        time.sleep(0.001)
    producer.release.set()
    flushed.join(5)
    assert clock.trace == ["event"] * 30
    emitter.close(5)


def closed_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def test_messages_in_flight_to_an_unreachable_broker_hold_nothing_the_collector_walks(tmp_path):
    producer = SpoolingProducer(Settings(kafka=closed_port()), tmp_path / "spool")
    try:
        for i in range(5_000):
            producer.append("t", b"run", f"event {i}".encode())
        producer.flush(0)
        spool = producer._own
        deadline = time.monotonic() + 30
        while len(spool.outstanding) < 5_000 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(spool.outstanding) == 5_000, "every spooled row handed to librdkafka"
        gc.collect()
        tracked = len(gc.get_objects())
        for i in range(5_000, 10_000):
            producer.append("t", b"run", f"event {i}".encode())
        producer.flush(0)
        while len(spool.outstanding) < 10_000 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(spool.outstanding) == 10_000
        gc.collect()
        # before, each message in flight held a closure and its defaults (two tracked objects): 10,000 more here
        assert len(gc.get_objects()) - tracked < 500
        assert producer.undelivered() == 10_000
    finally:
        producer.close()


@pytest.mark.kafka
def test_the_same_bytes_twice_in_flight_are_both_delivered(kafka_settings):
    from trainwire.infra.log import ensure_topics, open_consumer

    topic = kafka_settings.topic("twice")
    ensure_topics(kafka_settings, [topic])
    producer = SpoolingProducer(kafka_settings, kafka_settings.spool_dir)
    for value in (b"same", b"same", b"other", b"same"):
        producer.append(topic, b"run", value)
    assert producer.flush(30) == 0 and producer.sent == 4
    producer.close()
    consumer = open_consumer(kafka_settings, kafka_settings.topic("g"), [topic])
    values: list[bytes] = []
    deadline = time.monotonic() + 30
    while len(values) < 4 and time.monotonic() < deadline:
        values += [r.value for r in consumer.poll(100, 1.0)]
    consumer.close()
    assert values == [b"same", b"same", b"other", b"same"]
    assert not list(kafka_settings.spool_dir.glob("*.db")), "a drained spool is removed at close"


def test_installed_packages_are_read_once_per_process(monkeypatch, tmp_path):
    monkeypatch.setattr(environment, "_scanned", None)
    scans = []
    distributions = metadata.distributions
    monkeypatch.setattr(environment.metadata, "distributions", lambda: scans.append(1) or distributions())
    first = environment.packages_sha256()
    assert environment.packages_sha256() == first and environment.installed_packages()
    assert environment.environment_versions()["trainwire"] == metadata.version("trainwire")
    assert len(scans) == 1

    # a package installed meanwhile changes its directory: the list is read again
    monkeypatch.setattr(sys, "path", [*sys.path, str(tmp_path)])
    environment.installed_packages()
    assert len(scans) == 2
    (tmp_path / "extra-1.0.dist-info").mkdir()
    (tmp_path / "extra-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: Extra_Pkg\nVersion: 1.0\n")
    assert "extra-pkg==1.0" in environment.installed_packages()
    assert len(scans) == 3 and environment.packages_sha256() != first


def test_the_quick_metadata_read_agrees_with_importlib():
    """Name and Version come from the metadata headers alone; importlib parses the whole file as e-mail."""
    for dist in metadata.distributions():
        assert environment._name_and_version(dist) == (dist.metadata["Name"], dist.version)


def test_prefetching_reads_the_packages_off_the_calling_thread(monkeypatch):
    monkeypatch.setattr(environment, "_scanned", None)
    readers = []
    distributions = metadata.distributions
    monkeypatch.setattr(environment.metadata, "distributions",
                        lambda: readers.append(threading.current_thread().name) or distributions())
    environment.prefetch_packages()
    environment.packages_sha256()  # waits for the prefetch instead of reading again
    assert readers == ["trainwire-packages"]
