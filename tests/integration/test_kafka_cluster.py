"""Trainwire on the three-broker KRaft cluster of infra/kafka/up --brokers 3: the topics it makes are replicated, and
the leader of a busy partition killed mid-stream costs no event, stores none twice and never blocks training."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource

from tests.integration.kafka_fixtures import KafkaCluster, kafka_cluster  # noqa: F401
from trainwire.consumers.service import INGEST_GROUP
from trainwire.infra.config import Settings
from trainwire.infra.log import ensure_topics
from trainwire.infra.log.topics import ALERTS, CONTROL, DEAD_LETTERS, EVENTS, GPU
from trainwire.infra.store import connect_store
from trainwire.infra.store.read import StoreReader
from trainwire.producers import init

pytestmark = pytest.mark.kafka

STEPS = 3000
WAIT = 90.0


def cluster_settings(cluster: KafkaCluster, home) -> Settings:
    return Settings(home=home, kafka=cluster.bootstrap, topic_prefix=f"test-cluster-{uuid.uuid4().hex[:8]}.",
                    batch_max_seconds=0.2)


def wait_for(what: str, condition, seconds: float = WAIT):
    deadline = time.monotonic() + seconds
    while not (found := condition()):
        assert time.monotonic() < deadline, f"{what}: not within {seconds:.0f}s"
        time.sleep(0.2)
    return found


def test_topics_trainwire_makes_have_three_replicas_and_need_two_in_sync(kafka_cluster, tmp_path):
    settings = cluster_settings(kafka_cluster, tmp_path / "home")
    topics = [settings.topic(name) for name in (EVENTS, GPU, ALERTS, CONTROL, DEAD_LETTERS)]
    ensure_topics(settings, topics)

    admin = AdminClient({"bootstrap.servers": kafka_cluster.bootstrap})
    metadata = admin.list_topics(timeout=10)
    for topic in topics:
        assert {len(p.replicas) for p in metadata.topics[topic].partitions.values()} == {3}, topic
    described = admin.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, t) for t in topics])
    for resource, future in described.items():
        assert future.result(timeout=10)["min.insync.replicas"].value == "2", resource


class Training:
    """An SDK run logging STEPS steps back to back in a thread, timing each log_step call."""

    def __init__(self, settings: Settings):
        self.run = init("cluster", settings=settings, sample_gpus=False)
        self.slowest = 0.0
        self.thread = threading.Thread(target=self._train, daemon=True)
        self.thread.start()

    def _train(self) -> None:
        for step in range(1, STEPS + 1):
            started = time.perf_counter()
            self.run.log_step(step, loss=1.0 / step)
            self.slowest = max(self.slowest, time.perf_counter() - started)
            time.sleep(0.004)


def busiest_partition(consumer: Consumer, topic: str) -> int | None:
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    counts = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in partitions}
    partition, count = max(counts.items(), key=lambda item: item[1])
    return partition if count > 0 else None


def all_committed(consumer: Consumer, topics: list[str]) -> bool:
    """Whether the ingest group has committed every record of `topics` (i.e. stored it)."""
    for topic in topics:
        partitions = [TopicPartition(topic, p) for p in consumer.list_topics(topic, timeout=10).topics[topic].partitions]
        for tp in consumer.committed(partitions, timeout=10):
            if max(tp.offset, 0) < consumer.get_watermark_offsets(tp, timeout=10)[1]:
                return False
    return True


def test_a_busy_partitions_leader_killed_mid_stream_loses_and_duplicates_nothing_and_never_blocks_training(
        kafka_cluster, tmp_path):
    settings = cluster_settings(kafka_cluster, tmp_path / "home")
    events, telemetry = settings.topic(EVENTS), [settings.topic(EVENTS), settings.topic(GPU)]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TRAINWIRE_")},
           "TRAINWIRE_HOME": str(settings.home), "TRAINWIRE_KAFKA": kafka_cluster.bootstrap,
           "TRAINWIRE_TOPIC_PREFIX": settings.topic_prefix, "TRAINWIRE_BATCH_MAX_SECONDS": "0.2"}
    ingest = subprocess.Popen([sys.executable, "-m", "trainwire", "consume"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    watcher = Consumer({"bootstrap.servers": kafka_cluster.bootstrap, "group.id": settings.topic(INGEST_GROUP)})
    try:
        wait_for("consume made the topics", lambda: events in watcher.list_topics(timeout=10).topics)
        training = Training(settings)
        partition = wait_for("the run's first events", lambda: busiest_partition(watcher, events), 30)
        leader = watcher.list_topics(events, timeout=10).topics[events].partitions[partition].leader
        assert training.thread.is_alive()
        os.kill(kafka_cluster.pid(leader), signal.SIGKILL)  # mid-stream: the run keeps logging

        training.thread.join(WAIT)
        assert not training.thread.is_alive(), "training did not get through its steps"
        training.run.finish()
        wait_for("ingest stored every record", lambda: all_committed(watcher, telemetry))
    finally:
        watcher.close()
        ingest.send_signal(signal.SIGTERM)
        _, errors = ingest.communicate(timeout=60)
    assert ingest.returncode == 0, errors[-3000:]

    client = connect_store(settings.store_dsn)
    try:
        run_id = training.run.run_id
        assert StoreReader(client).events_stored([run_id]) == training.run.events_emitted  # nothing lost
        raw = client.query("SELECT count(), uniqExact(step) FROM steps WHERE run_id = {r:String}",
                           parameters={"r": run_id}).result_rows[0]
        assert tuple(raw) == (STEPS, STEPS)  # without FINAL: no step stored twice
    finally:
        client.close()
    assert training.slowest < 0.5, f"log_step blocked the training thread for {training.slowest:.3f}s"
