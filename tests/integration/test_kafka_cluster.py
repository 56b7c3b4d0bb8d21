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
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from tests.integration.kafka_fixtures import CLUSTER_PORT, UP, KafkaCluster, kafka_cluster, script_env  # noqa: F401
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
    """`condition()` once true; a Kafka error (a leader not elected yet, or moving) counts as not yet."""
    deadline, last = time.monotonic() + seconds, None
    while True:
        try:
            if found := condition():
                return found
        except KafkaException as err:
            last = err
        assert time.monotonic() < deadline, f"{what}: not within {seconds:.0f}s (last error: {last})"
        time.sleep(0.2)


def test_topics_trainwire_makes_have_three_replicas_and_need_two_in_sync(kafka_cluster, tmp_path):
    settings = cluster_settings(kafka_cluster, tmp_path / "home")
    topics = [settings.topic(name) for name in (EVENTS, GPU, ALERTS, CONTROL, DEAD_LETTERS)]
    ensure_topics(settings, topics)

    admin = AdminClient({"bootstrap.servers": kafka_cluster.bootstrap})
    # the node asked may learn of topics just made a moment after the controller has them
    def knows_them():
        metadata = admin.list_topics(timeout=10)
        return metadata if set(topics) <= set(metadata.topics) else None

    metadata = wait_for("every node knows the topics", knows_them)
    for topic in topics:
        assert {len(p.replicas) for p in metadata.topics[topic].partitions.values()} == {3}, topic
    described = admin.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, t) for t in topics])
    for resource, future in described.items():
        assert future.result(timeout=10)["min.insync.replicas"].value == "2", resource


class Training:
    """An SDK run logging STEPS steps back to back in a thread, timing each log_step call."""

    def __init__(self, settings: Settings, run_id: str):
        self.run = init("cluster", settings=settings, sample_gpus=False, run_id=run_id)
        self.slowest = 0.0
        self.thread = threading.Thread(target=self._train, daemon=True)
        self.thread.start()

    def _train(self) -> None:
        for step in range(1, STEPS + 1):
            started = time.perf_counter()
            self.run.log_step(step, loss=1.0 / step)
            self.slowest = max(self.slowest, time.perf_counter() - started)
            time.sleep(0.004)


class ClusterView:
    """What the cluster says now: each question asked with a client of its own, as a long-lived client's view of
    leaders and coordinators lags behind a failover."""

    def __init__(self, bootstrap: str, group: str):
        self._config = {"bootstrap.servers": bootstrap, "group.id": group}

    def _ask(self, question):
        consumer = Consumer(self._config)
        try:
            return question(consumer)
        finally:
            consumer.close()

    def coordinator(self) -> int:
        """The node that coordinates the group (commits, membership)."""
        admin = AdminClient({"bootstrap.servers": self._config["bootstrap.servers"]})
        (future,) = admin.describe_consumer_groups([self._config["group.id"]]).values()
        return future.result(timeout=10).coordinator.id

    def partition_of(self, keys: list[str], partitions: int) -> dict[str, int]:
        """Where trainwire's producers put each key on a topic of `partitions` partitions: asked of librdkafka's
        own partitioner, on a scratch topic."""
        probe = f"{self._config['group.id']}-probe"
        admin = AdminClient({"bootstrap.servers": self._config["bootstrap.servers"]})
        admin.create_topics([NewTopic(probe, num_partitions=partitions)])[probe].result(timeout=30)
        producer = Producer({"bootstrap.servers": self._config["bootstrap.servers"], "partitioner": "murmur2_random"})
        placed: dict[str, int] = {}
        for key in keys:
            producer.produce(probe, b"", key=key.encode(),
                             on_delivery=lambda _err, msg, key=key: placed.__setitem__(key, msg.partition()))
        assert producer.flush(30) == 0
        return placed

    def topics(self) -> set[str]:
        return self._ask(lambda c: set(c.list_topics(timeout=10).topics))

    def leader(self, topic: str, partition: int) -> int:
        return self._ask(lambda c: c.list_topics(topic, timeout=10).topics[topic].partitions[partition].leader)

    def busiest_partition(self, topic: str) -> int | None:
        def ask(consumer: Consumer) -> int | None:
            partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
            ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in partitions}
            partition, end = max(ends.items(), key=lambda item: item[1])
            return partition if end > 0 else None
        return self._ask(ask)

    def all_committed(self, topics: list[str]) -> bool:
        """Whether the group has committed every record of `topics` (ingest: stored it)."""
        def ask(consumer: Consumer) -> bool:
            for topic in topics:
                numbers = consumer.list_topics(topic, timeout=10).topics[topic].partitions
                for tp in consumer.committed([TopicPartition(topic, p) for p in numbers], timeout=10):
                    if max(tp.offset, 0) < consumer.get_watermark_offsets(tp, timeout=10)[1]:
                        return False
            return True
        return self._ask(ask)


class ConsumeExited(AssertionError):
    """trainwire consume stopped while it had records to store."""


def still_running(process: subprocess.Popen) -> bool:
    if process.poll() is not None:
        raise ConsumeExited(f"trainwire consume exited with {process.returncode} (its stderr is printed below)")
    return True


def restart_killed_nodes() -> None:
    """up --brokers 3 again: it starts the nodes not running, so the next test has its three."""
    subprocess.run([str(UP), "--brokers", "3"], env=script_env(CLUSTER_PORT), capture_output=True, timeout=300,
                   check=True)


@pytest.mark.parametrize("victim", ["partition leader",
                                    "partition leader and group coordinator"])
def test_a_busy_partitions_leader_killed_mid_stream_loses_and_duplicates_nothing_and_never_blocks_training(
        kafka_cluster, tmp_path, victim):
    settings = cluster_settings(kafka_cluster, tmp_path / "home")
    events, telemetry = settings.topic(EVENTS), [settings.topic(EVENTS), settings.topic(GPU)]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TRAINWIRE_")},
           "TRAINWIRE_HOME": str(settings.home), "TRAINWIRE_KAFKA": kafka_cluster.bootstrap,
           "TRAINWIRE_TOPIC_PREFIX": settings.topic_prefix, "TRAINWIRE_BATCH_MAX_SECONDS": "0.2"}
    ingest = subprocess.Popen([sys.executable, "-m", "trainwire", "consume"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    cluster = ClusterView(kafka_cluster.bootstrap, settings.topic(INGEST_GROUP))
    try:
        wait_for("consume made the topics", lambda: events in cluster.topics())
        coordinator = wait_for("the group's coordinator", cluster.coordinator)
        # a run whose partition is led by the coordinator, or by another node, as the case asks
        candidates = cluster.partition_of([f"run-{i}" for i in range(32)], settings.kafka_partitions)
        run_id, partition = next((key, p) for key, p in candidates.items()
                                 if (cluster.leader(events, p) == coordinator) == ("coordinator" in victim))
        leader = cluster.leader(events, partition)
        training = Training(settings, run_id)
        wait_for("the run's first events", lambda: cluster.busiest_partition(events) == partition)
        assert training.thread.is_alive()
        os.kill(kafka_cluster.pid(leader), signal.SIGKILL)  # mid-stream: the run keeps logging

        training.thread.join(WAIT)
        assert not training.thread.is_alive(), "training did not get through its steps"
        training.run.finish()
        wait_for("ingest stored every record", lambda: still_running(ingest) and cluster.all_committed(telemetry))
        assert cluster.leader(events, partition) not in (leader, -1), "the partition's leadership did not move"
    finally:
        ingest.send_signal(signal.SIGTERM)
        _, errors = ingest.communicate(timeout=60)
        print(errors[-5000:])  # shown with a failure
        restart_killed_nodes()
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
