"""`trainwire alerts` SIGKILLed in the middle of paging a slow receiver, through the real broker and real HTTP: a
successor pages what it left within seconds, `trainwire alerts --drain` exits 0, and no page the outbox recorded
as delivered goes out again. The one page whose request was in flight when the process died is sent again, with
the same Idempotency-Key, since nothing can tell whether the receiver acted on it."""

import collections
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.recording_server import RecordingServer
from trainwire.infra.codecs import codec_for
from trainwire.infra.log import ensure_topics, open_producer
from trainwire.infra.log.topics import ALERTS
from trainwire.schemas import Alert

pytestmark = pytest.mark.kafka
ANSWER_DELAY = 1.0  # the receiver answers each page a second after it arrives
INCIDENTS = 5
SUCCESSOR_PAGES_WITHIN = 10.0


def publish_incidents(settings) -> None:
    producer = open_producer(settings)
    codec = codec_for(settings)
    ensure_topics(settings, [settings.topic(ALERTS)])
    for step in range(1, INCIDENTS + 1):
        alert = Alert(run_id="run-crash", experiment="paging", team="nlp", rule="loss_not_finite",
                      severity="critical", state="firing", step=step, message=f"train loss is nan at step {step}",
                      dedup_key=f"run-crash/loss_not_finite/{step}")
        producer.append(settings.topic(ALERTS), b"run-crash", codec.encode(alert))
    assert producer.flush(30) == 0
    producer.close()


def alerts_env(settings, server_url: str) -> dict[str, str]:
    sinks = [{"kind": "webhook", "url": f"{server_url}/hook"},
             {"kind": "pagerduty", "url": f"{server_url}/v2/enqueue", "routing_key": "R0UT1NG"}]
    return {**{k: v for k, v in os.environ.items() if not k.startswith("TRAINWIRE_")},
            "TRAINWIRE_HOME": str(settings.home), "TRAINWIRE_KAFKA": settings.kafka,
            "TRAINWIRE_TOPIC_PREFIX": settings.topic_prefix, "TRAINWIRE_ALERTING": json.dumps({"sinks": sinks})}


def page_of(received) -> tuple[str, str, str]:
    """(sink path, dedup key, state) of a request: what the outbox delivers once."""
    body = received.body
    state = body.get("state") or {"trigger": "firing", "resolve": "resolved"}[body["event_action"]]
    return received.path, body["dedup_key"], state


def idempotency_key(received) -> str | None:
    return {name.lower(): value for name, value in received.headers.items()}.get("idempotency-key")


def wait_until_every_sink_waits_on_a_page(server, paths, timeout=60.0) -> list:
    """The moment each sink's request has been at the receiver for a while and will not be answered for a while:
    no page is then between its answer and its record in the outbox. Returns those requests."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        waiting = {r.path: r for r in server.unanswered()}
        ages = [time.time() - waiting[p].at for p in paths if p in waiting]
        if len(ages) == len(paths) and len(server.bodies("/hook")) >= 3 and all(0.2 < a < 0.7 for a in ages):
            return [waiting[p] for p in paths]
        time.sleep(0.02)
    raise AssertionError(f"the first consumer never paged every sink: {len(server.received)} requests")


def test_a_successor_pages_what_a_killed_consumer_held_within_seconds_and_resends_only_its_request_in_flight(
        kafka_settings, tmp_path):
    paths = ["/hook", "/v2/enqueue"]
    with RecordingServer() as server:
        server.answer_delay = ANSWER_DELAY
        env = alerts_env(kafka_settings, server.url)
        publish_incidents(kafka_settings)
        with open(tmp_path / "first.log", "w") as log:
            first = subprocess.Popen([sys.executable, "-m", "trainwire", "alerts"], env=env, stdout=log,
                                     stderr=subprocess.STDOUT)
        try:
            in_flight = wait_until_every_sink_waits_on_a_page(server, paths)
            answered_before = [r for r in server.received if r.answered.is_set()]
            first.send_signal(signal.SIGKILL)
        finally:
            first.kill()
            first.wait(10)

        started = time.time()
        successor = subprocess.run([sys.executable, "-m", "trainwire", "alerts", "--drain", "--json"], env=env,
                                   capture_output=True, text=True, timeout=120)
        assert successor.returncode == 0, successor.stderr[-3000:]
        assert server.wait_for(2 * INCIDENTS + len(in_flight), timeout=1.0)
        last_arrival = max(r.at for r in server.received)
        assert last_arrival - started < SUCCESSOR_PAGES_WITHIN, (
            f"the successor took {last_arrival - started:.1f}s to page what the killed consumer held")

        arrivals = collections.Counter(page_of(r) for r in server.received)
        expected = {(p, f"run-crash/loss_not_finite/{step}", "firing"): 1
                    for p in paths for step in range(1, INCIDENTS + 1)}
        for request in in_flight:  # the receiver may have acted on it: it is sent again, never dropped
            expected[page_of(request)] = 2
        assert dict(arrivals) == expected
        assert all(arrivals[page_of(r)] == 1 for r in answered_before)  # recorded as delivered: never again

        for request in in_flight:
            keys = {idempotency_key(r) for r in server.received if page_of(r) == page_of(request)}
            assert len(keys) == 1 and None not in keys, keys  # a receiver can de-duplicate the re-send
        result = json.loads(successor.stdout)
        assert {name: counts["delivered"] for name, counts in result["sinks"].items()} == {
            "webhook": INCIDENTS - len([r for r in answered_before if r.path == "/hook"]),
            "pagerduty": INCIDENTS - len([r for r in answered_before if r.path == "/v2/enqueue"]),
            "stop-switch": 0}
        assert "may have reached" in successor.stderr  # says which page it sent again and why
