"""`trainwire consume` as a Kafka consumer group: members share partitions, a SIGKILLed member loses nothing."""

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest
from confluent_kafka import Consumer, TopicPartition

from trainwire.consumers.service import INGEST_GROUP
from trainwire.infra.config import Settings
from trainwire.infra.log import ensure_topics, open_consumer, open_producer
from trainwire.infra.log.topics import DEAD_LETTERS, EVENTS, GPU
from trainwire.infra.store import connect_store
from trainwire.producers import init
from trainwire.producers.session import close_all
from trainwire.producers.simulate import JobPlan, run_job
from trainwire.schemas import Step, encode

pytestmark = pytest.mark.kafka


def member(settings: Settings, store: str, log_path) -> subprocess.Popen:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TRAINWIRE_")},
           "TRAINWIRE_KAFKA": settings.kafka, "TRAINWIRE_TOPIC_PREFIX": settings.topic_prefix,
           "TRAINWIRE_STORE": store, "TRAINWIRE_HOME": str(settings.home), "TRAINWIRE_BATCH_MAX_SECONDS": "0.2"}
    with open(log_path, "a") as log:
        return subprocess.Popen([sys.executable, "-m", "trainwire", "consume", "--json"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)


def uncommitted(settings: Settings, topics: list[str]) -> int:
    """Records of `topics` the ingest group has not committed (stored), read without joining the group."""
    reader = Consumer({"bootstrap.servers": settings.kafka, "group.id": settings.topic(INGEST_GROUP)},
                      logger=logging.getLogger("librdkafka"))
    partitions = []
    for topic in topics:
        partitions += [TopicPartition(topic, p) for p in reader.list_topics(topic, timeout=10).topics[topic].partitions]
    pending = 0
    for tp in reader.committed(partitions, timeout=10):
        low, high = reader.get_watermark_offsets(tp, timeout=10)
        pending += high - (tp.offset if tp.offset >= 0 else low)
    reader.close()
    return pending


def stored_ids(store: str) -> tuple[list[str], int]:
    """Distinct event ids in one store, and its row count as a query reads it (FINAL)."""
    client = connect_store(store)
    ids, final_rows = [], 0
    for table in ("run_started", "steps", "evals", "checkpoints", "run_ended"):
        ids += [r[0] for r in client.query(f"SELECT event_id FROM {table} FINAL").result_rows]
    final_rows = len(ids)
    client.close()
    return ids, final_rows


def stream_and_kill(settings, members, stores, tmp_path) -> int:
    """8 runs stream for a few seconds; member a is SIGKILLed mid-stream and restarted. Returns events produced."""
    runs = [init("group", f"job-{i}", settings=settings, sample_gpus=False) for i in range(8)]
    threads = [threading.Thread(target=run_job, args=(run, JobPlan(steps=600, step_seconds=0.01, seed=i)))
               for i, run in enumerate(runs)]
    for thread in threads:
        thread.start()
    time.sleep(3)
    members["a"].send_signal(signal.SIGKILL)  # mid-stream, no goodbye
    members["a"].wait(10)
    members["a"] = member(settings, stores["a"], tmp_path / "a.log")
    for thread in threads:
        thread.join(60)
    for run in runs:
        assert run.finish()
    close_all()
    return sum(run.events_emitted for run in runs)


def test_a_member_killed_mid_stream_loses_nothing(kafka_settings, tmp_path):
    settings = kafka_settings.model_copy(update={"heartbeat_seconds": 600})
    ensure_topics(settings, [settings.topic(t) for t in (EVENTS, GPU)], partitions=8)
    stores = {name: f"chdb://{tmp_path / name}" for name in ("a", "b")}
    members = {name: member(settings, store, tmp_path / f"{name}.log") for name, store in stores.items()}
    try:
        produced = stream_and_kill(settings, members, stores, tmp_path)
        deadline = time.monotonic() + 90
        # members commit only what they stored
        while uncommitted(settings, [settings.topic(EVENTS)]) and time.monotonic() < deadline:
            time.sleep(1)
        for proc in members.values():
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0, (tmp_path / "a.log").read_text()[-2000:]
    finally:
        for proc in members.values():
            if proc.poll() is None:
                proc.kill()

    ids_a, rows_a = stored_ids(stores["a"])
    ids_b, rows_b = stored_ids(stores["b"])
    assert len(set(ids_a)) == rows_a and len(set(ids_b)) == rows_b, "a store holds an event twice"
    assert len(set(ids_a) | set(ids_b)) == produced, "events lost"
    # With one ClickHouse server both members write one store and the overlap collapses; with two embedded
    # stores the killed member's last uncommitted batch may also sit in the other member's store.
    assert len(set(ids_a) & set(ids_b)) <= settings.batch_max_rows


def test_poison_messages_reach_the_dead_letter_topic(kafka_settings):
    from trainwire.consumers.service import build_ingest

    producer = open_producer(kafka_settings)
    topic = kafka_settings.topic(EVENTS)
    producer.append(topic, b"r", b"\x07 not avro")
    producer.append(topic, b"r", encode(Step(run_id="r", experiment="x", seq=0, step=1, loss=1.0)))
    assert producer.flush(30) == 0
    pipeline = build_ingest(kafka_settings, on_alert=lambda a: None)
    pipeline.drain(idle_seconds=2.0)
    pipeline.close()
    assert pipeline.stats.dead_lettered == 1 and pipeline.stats.stored == 1

    dlq = open_consumer(kafka_settings, f"check-{uuid.uuid4().hex[:6]}", [kafka_settings.topic(DEAD_LETTERS)])
    records, deadline = [], time.monotonic() + 30
    while not records and time.monotonic() < deadline:
        records = dlq.poll(10, 1.0)
    dlq.close()
    (letter,) = [json.loads(r.value) for r in records]
    assert letter["topic"] == topic and letter["reason"].startswith("CorruptPayloadError")
    import base64

    assert base64.b64decode(letter["payload_base64"]) == b"\x07 not avro"


def test_drain_reports_success_only_once_caught_up(kafka_settings):
    """`consume --drain` started before its partitions are assigned must wait for them, not report
    `consumed 0` with exit 0 while every record is still pending."""
    ensure_topics(kafka_settings, [kafka_settings.topic(t) for t in (EVENTS, GPU, DEAD_LETTERS)])
    producer = open_producer(kafka_settings)
    for seq in range(500):
        producer.append(kafka_settings.topic(EVENTS), b"pending", encode(Step(run_id="pending", experiment="e",
                                                                              seq=seq, step=seq)))
    assert producer.flush(30) == 0
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TRAINWIRE_")},
           "TRAINWIRE_KAFKA": kafka_settings.kafka, "TRAINWIRE_TOPIC_PREFIX": kafka_settings.topic_prefix,
           "TRAINWIRE_HOME": str(kafka_settings.home)}
    result = subprocess.run([sys.executable, "-m", "trainwire", "consume", "--drain", "--idle-seconds", "0.1",
                             "--json"], env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["stored"] == 500
    assert uncommitted(kafka_settings, [kafka_settings.topic(EVENTS)]) == 0
