"""Paging end to end on the real broker: an SDK run logs a NaN loss and a grad-norm burst; ingest's detectors raise
alerts; the alert consumer pages every sink its routes select, through real HTTP, once per incident and state, even
when the alerts topic is read again from the start."""

import math
import threading
import time

import pytest

from tests.paging_fakes import running
from tests.recording_server import RecordingServer
from trainwire.consumers.alerting.service import build_alerting, run_alerting
from trainwire.consumers.service import build_ingest, run_ingest
from trainwire.infra.alerting_settings import AlertingSettings, SinkSettings
from trainwire.producers import init

pytestmark = pytest.mark.kafka
WAIT = 20.0


def paging_settings(settings, server):
    return settings.model_copy(update={"alerting": AlertingSettings(dashboard_url="http://ops:8501", sinks=[
        SinkSettings(kind="webhook", url=f"{server.url}/hook"),
        SinkSettings(kind="pagerduty", url=f"{server.url}/v2/enqueue", routing_key="R0UT1NG",
                     severities=("critical", "block")),
        SinkSettings(kind="slack", url=f"{server.url}/slack", teams=("vision",)),  # another team's channel
        SinkSettings(kind="alertmanager", url=server.url, states=("firing",)),
    ])})


def log_a_troubled_run(settings) -> str:
    with init("paging", team="nlp", settings=settings, sample_gpus=False) as run:
        for step in range(1, 16):
            loss = math.nan if step == 8 else 2.0 - step * 0.05
            run.log_step(step, loss=loss, grad_norm=50.0 if step == 4 else 1.0, learning_rate=1e-4)
    return run.run_id


def settled(server, expected: int) -> list:
    """What arrived once `expected` requests did and nothing more followed for a moment."""
    server.wait_for(expected, WAIT)
    time.sleep(1.0)
    return server.received


def test_each_sink_is_paged_once_per_incident_and_state_by_its_route(kafka_settings):
    with RecordingServer() as server:
        settings = paging_settings(kafka_settings, server)
        with running(run_ingest, build_ingest(settings, on_alert=lambda alert: None)), \
                running(run_alerting, build_alerting(settings)):
            run_id = log_a_troubled_run(settings)
            # webhook: 2 incidents × (firing, resolved); PagerDuty: the NaN's trigger and resolve;
            # Alertmanager: 2 firing; Slack: nothing (another team)
            received = settled(server, 8)

        by_path = {path: [r.body for r in received if r.path == path]
                   for path in ("/hook", "/v2/enqueue", "/slack", "/api/v2/alerts")}
        assert sorted((b["rule"], b["state"]) for b in by_path["/hook"]) == [
            ("grad_norm_high", "firing"), ("grad_norm_high", "resolved"),
            ("loss_not_finite", "firing"), ("loss_not_finite", "resolved")]
        assert all(b["run_id"] == run_id and b["team"] == "nlp" for b in by_path["/hook"])
        trigger, resolve = by_path["/v2/enqueue"]
        assert (trigger["event_action"], resolve["event_action"]) == ("trigger", "resolve")
        assert trigger["dedup_key"] == resolve["dedup_key"] == f"{run_id}/loss_not_finite/8"
        assert trigger["payload"]["severity"] == "critical" and trigger["payload"]["custom_details"]["step"] == 8
        assert by_path["/slack"] == []
        assert sorted(b[0]["labels"]["alertname"] for b in by_path["/api/v2/alerts"]) == [
            "grad_norm_high", "loss_not_finite"]
        assert len(received) == 8

        # The alerts topic read again from its start (a new consumer group: every alert redelivered): no new page.
        again = build_alerting(settings, group="alerts-replayed")
        assert again.drain(idle_seconds=2.0, stop=threading.Event())
        assert again.read >= 4 and again.enqueued == 0
        again.close()
        time.sleep(0.5)
        assert len(server.received) == 8


def test_pages_wait_out_a_sink_outage_and_arrive_once_it_is_back(kafka_settings):
    with RecordingServer() as server:
        server.always_status = 503  # the receiver is down when the incident fires
        settings = paging_settings(kafka_settings, server)
        settings = settings.model_copy(update={"alerting": settings.alerting.model_copy(
            update={"retry_initial_seconds": 0.2, "retry_max_seconds": 0.5})})
        with running(run_ingest, build_ingest(settings, on_alert=lambda alert: None)), \
                running(run_alerting, build_alerting(settings)) as consumer:
            log_a_troubled_run(settings)
            deadline = time.monotonic() + WAIT
            while server.refused < 12:  # every sink has been refused and retried
                assert time.monotonic() < deadline, f"only {server.refused} attempts while the receiver was down"
                time.sleep(0.1)
            assert server.received == []
            server.always_status = None
            received = settled(server, 8)
            assert len(received) == 8
            assert {row["sink"]: row["delivered"] for row in consumer.outbox.summary()}["webhook"] == 4


def test_records_that_are_no_alert_on_the_alerts_topic_are_skipped_and_paging_goes_on(kafka_settings):
    """A tombstone, garbage and a step on the alerts topic: each is skipped with a line, the alert after them
    pages, and `--drain` finishes."""
    from confluent_kafka import Producer

    from trainwire.infra.log import ensure_topics
    from trainwire.schemas import Alert, Step, encode

    with RecordingServer() as server:
        settings = kafka_settings.model_copy(update={"alerting": AlertingSettings(sinks=[
            SinkSettings(kind="webhook", url=f"{server.url}/hook")])})
        topic = settings.topic("alerts")
        ensure_topics(settings, [topic])
        producer = Producer({"bootstrap.servers": settings.kafka})
        producer.produce(topic, key=b"r", value=None)
        producer.produce(topic, key=b"r", value=b"\x00garbage")
        producer.produce(topic, key=b"r", value=encode(Step(run_id="r", experiment="e", seq=0, step=0)))
        producer.produce(topic, key=b"r", value=encode(Alert(
            run_id="r", experiment="e", rule="loss_not_finite", severity="critical", state="firing",
            dedup_key="r/loss_not_finite/1", message="loss is NaN")))
        assert producer.flush(30) == 0
        consumer = build_alerting(settings, stop_switch=False)
        try:
            assert consumer.drain(idle_seconds=1.0, stop=threading.Event())
        finally:
            consumer.close()
        assert consumer.undecodable == 3 and consumer.read == 4
        assert [request.path for request in server.received] == ["/hook"]
