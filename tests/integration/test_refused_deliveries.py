"""Deliveries the real broker refuses (issue 15): a topic whose `max.message.bytes` is too small for any record
answers MSG_SIZE_TOO_LARGE, as an ACL answers TOPIC_AUTHORIZATION_FAILED on a secured cluster. The producer says so
to its caller; ingest keeps its batch uncommitted until its alerts and dead letters are published, and they page
once; the stop switch retries a refused stop command instead of reporting it sent."""

import logging
import math
import threading
import time
import uuid

import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource, NewTopic

from tests.integration.test_poison import produce, step
from tests.recording_server import RecordingServer
from trainwire.consumers.alerting.dispatcher import Dispatcher
from trainwire.consumers.alerting.outbox import Outbox
from trainwire.consumers.alerting.service import build_alerting
from trainwire.consumers.alerting.stop_switch import StopSwitchSink
from trainwire.consumers.service import INGEST_GROUP, build_ingest
from trainwire.infra.alerting_settings import AlertingSettings, SinkSettings
from trainwire.infra.log import TransportError, ensure_topics, open_consumer
from trainwire.infra.log.base import DeliveryRefusedError
from trainwire.infra.log.kafka import KafkaLogProducer
from trainwire.infra.log.topics import ALERTS, CONTROL, DEAD_LETTERS, EVENTS
from trainwire.schemas import Alert, decode

pytestmark = pytest.mark.kafka
TOO_SMALL = "64"  # bytes: less than any record batch
ROOMY = "1048588"  # the broker's default
WAIT = 30.0
TOO_LARGE = "Message size too large"  # librdkafka's text for MSG_SIZE_TOO_LARGE


def create_small_topic(settings, topic: str) -> None:
    admin = AdminClient({"bootstrap.servers": settings.kafka})
    admin.create_topics([NewTopic(topic, settings.kafka_partitions, 1,
                                  config={"max.message.bytes": TOO_SMALL})])[topic].result(30)


def set_max_message_bytes(settings, topic: str, value: str) -> None:
    admin = AdminClient({"bootstrap.servers": settings.kafka})
    resource = ConfigResource("TOPIC", topic, incremental_configs=[
        ConfigEntry("max.message.bytes", value, incremental_operation=AlterConfigOpType.SET)])
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(30)


def committed(settings, group: str, topic: str) -> int:
    """The group's committed offsets on `topic`, summed over its partitions (negative ones, none, count 0)."""
    consumer = Consumer({"bootstrap.servers": settings.kafka, "group.id": group})
    try:
        partitions = [TopicPartition(topic, p) for p in range(settings.kafka_partitions)]
        return sum(max(0, tp.offset) for tp in consumer.committed(partitions, timeout=10))
    finally:
        consumer.close()


def records_held(settings, topic: str) -> int:
    """How many records `topic` holds (its partitions' end offsets)."""
    consumer = Consumer({"bootstrap.servers": settings.kafka, "group.id": f"ends-{uuid.uuid4().hex[:6]}"})
    try:
        return sum(consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                   for p in range(settings.kafka_partitions))
    finally:
        consumer.close()


def records_on(settings, topic: str, expected: int) -> list:
    consumer = open_consumer(settings, f"reader-{uuid.uuid4().hex[:6]}", [settings.topic(topic)])
    try:
        out, deadline = [], time.monotonic() + WAIT
        while len(out) < expected and time.monotonic() < deadline:
            out += consumer.poll(100, 0.5)
        out += consumer.poll(100, 1.0)  # and nothing more
        return out
    finally:
        consumer.close()


def test_the_producer_raises_naming_the_topic_and_the_brokers_reason(kafka_settings):
    topic = kafka_settings.topic(ALERTS)
    create_small_topic(kafka_settings, topic)
    producer = KafkaLogProducer(kafka_settings)
    try:
        producer.append(topic, b"run-1", b"x" * 300)
        with pytest.raises(TransportError, match=rf"{topic}.*{TOO_LARGE}"):
            producer.flush(30)
        set_max_message_bytes(kafka_settings, topic, ROOMY)
        deadline = time.monotonic() + WAIT
        while True:  # the broker applies a topic's new config a moment after it answered
            producer.append(topic, b"run-1", b"x" * 300)
            try:
                assert producer.flush(30) == 0
                break
            except DeliveryRefusedError:
                assert time.monotonic() < deadline, "still refused after the topic's limit was raised"
                time.sleep(0.5)
        assert producer.flush(1) == 0, "a refusal is reported once, by the flush after it"
    finally:
        producer.close()


def test_ingest_commits_no_batch_whose_alert_or_dead_letter_was_refused_and_pages_once_after_the_fix(
        kafka_settings, caplog):
    settings = kafka_settings
    alerts, dead_letters = settings.topic(ALERTS), settings.topic(DEAD_LETTERS)
    for topic in (alerts, dead_letters):
        create_small_topic(settings, topic)
    ensure_topics(settings, [settings.topic(EVENTS)])
    run = f"refused-{uuid.uuid4().hex[:8]}"
    events = settings.topic(EVENTS)
    produce(settings.kafka, [(events, run.encode(), step(run, 1)),
                             (events, run.encode(), step(run, 2, loss=math.nan)),  # pages
                             (events, run.encode(), b"\x00\xffnot avro at all")])  # is dead-lettered
    group = settings.topic(INGEST_GROUP)
    pipeline = build_ingest(settings, on_alert=lambda alert: None)

    def ingest_until(done, most: int = 12) -> None:
        for _ in range(most):
            pipeline.run_once(poll_timeout=1.0, force_flush=True)
            if done():
                return

    try:
        with caplog.at_level(logging.WARNING, logger="trainwire.consumers.ingest"):
            ingest_until(lambda: pipeline.stats.retries >= 2)
        assert pipeline.stats.retries >= 2 and pipeline.stats.consumed == 0
        assert committed(settings, group, events) == 0, "a batch whose alert was refused was committed"
        retried = [r.getMessage() for r in caplog.records if "re-reading from the last commit" in r.getMessage()]
        assert retried and all(alerts in line or dead_letters in line for line in retried), retried
        assert all(TOO_LARGE in line for line in retried), retried

        # The alerts topic takes them again; dead letters are still refused: the batch is still read again, and
        # its alert published again on every try
        set_max_message_bytes(settings, alerts, ROOMY)
        ingest_until(lambda: records_held(settings, alerts) >= 1)
        assert records_held(settings, alerts) >= 1 and committed(settings, group, events) == 0

        set_max_message_bytes(settings, dead_letters, ROOMY)
        ingest_until(lambda: pipeline.stats.consumed == 3)
        assert pipeline.stats.consumed == 3 and committed(settings, group, events) == 3
    finally:
        pipeline.close()

    published = [decode(r.value) for r in records_on(settings, ALERTS, 2)]
    assert len(published) >= 2 and {a.dedup_key for a in published} == {f"{run}/loss_not_finite/2"}
    assert len({a.event_id for a in published}) == 1  # the same alert each time
    assert len(records_on(settings, DEAD_LETTERS, 1)) >= 1

    with RecordingServer() as pager:
        paging = settings.model_copy(update={"alerting": AlertingSettings(
            sinks=[SinkSettings(kind="webhook", url=pager.url)])})
        alerting = build_alerting(paging, group="test-alerts", stop_switch=False)
        try:
            assert alerting.drain(idle_seconds=2.0, stop=threading.Event(), settle_seconds=WAIT)
            assert alerting.read == len(published) and alerting.enqueued == 1
            pager.wait_for(1, WAIT)
            time.sleep(1.0)
            assert [(p.body["dedup_key"], p.body["state"]) for p in pager.received] == [
                (f"{run}/loss_not_finite/2", "firing")]
            assert [(s["sink"], s["delivered"]) for s in alerting.outbox.summary()] == [("webhook", 1)]
        finally:
            alerting.close()


def block_alert(run_id: str) -> Alert:
    return Alert(run_id=run_id, experiment="exp", rule="loss_not_finite", severity="block", state="firing", step=5,
                 value=float("nan"), message="train loss is nan at step 5", dedup_key=f"{run_id}/loss_not_finite/5")


def test_a_refused_stop_command_is_retried_by_the_outbox_never_reported_sent(kafka_settings, tmp_path, caplog):
    settings = kafka_settings
    control = settings.topic(CONTROL)
    create_small_topic(settings, control)
    run = f"stop-{uuid.uuid4().hex[:8]}"
    sink = StopSwitchSink(settings, opted_in=lambda run_id: True)
    outbox = Outbox(tmp_path / "outbox.db")
    dispatcher = Dispatcher([sink], outbox, AlertingSettings(retry_initial_seconds=0.2, retry_max_seconds=1.0))
    outbox.enqueue([(sink.name, block_alert(run))])
    try:
        with caplog.at_level(logging.INFO):
            dispatcher.start()
            deadline = time.monotonic() + WAIT
            while dispatcher.counts()[sink.name]["retried"] < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            [summary] = outbox.summary()
            assert dispatcher.counts()[sink.name]["retried"] >= 2 and summary["delivered"] == 0
            assert summary["pending"] == 1 and control in summary["last_error"] and TOO_LARGE in summary["last_error"]
            assert not [r for r in caplog.records if "told run" in r.getMessage()]

            set_max_message_bytes(settings, control, ROOMY)
            while outbox.summary()[0]["delivered"] == 0 and time.monotonic() < deadline + WAIT:
                time.sleep(0.1)
            assert outbox.summary()[0]["delivered"] == 1
            assert [r for r in caplog.records if f"told run {run} to stop" in r.getMessage()]
    finally:
        dispatcher.stop()
        sink.close()
        outbox.close()
    commands = [decode(r.value) for r in records_on(settings, CONTROL, 1)]
    assert [(c.run_id, c.dedup_key) for c in commands] == [(run, f"{run}/loss_not_finite/5")]
