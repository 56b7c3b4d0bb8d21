"""The stop switch on the local log: the sink's routing and commands, the run's listener, the SDK's stop API."""

import threading
import time

import pytest

from trainwire import TrainingStopped
from trainwire.consumers.alerting.sinks import SinkError
from trainwire.consumers.alerting.stop_switch import StopSwitchSink, stop_command
from trainwire.consumers.ingest import event_topics
from trainwire.infra.config import Settings
from trainwire.infra.log import open_consumer, open_producer, open_tail
from trainwire.infra.log.topics import CONTROL
from trainwire.producers import init
from trainwire.producers.control import StopListener
from trainwire.schemas import STOP_ON_BLOCK_TAG, Alert, StopCommand, decode, encode
from trainwire.schemas.events import now_ms

WAIT = 10.0  # seconds to wait for a background thread; never reached when the behaviour is right


def alert(run_id: str = "run-1", *, severity: str = "block", state: str = "firing", key: str = "run-1/nan",
          message: str = "train loss is nan at step 5") -> Alert:
    return Alert(run_id=run_id, experiment="exp", team="nlp", rule="loss_not_finite", severity=severity,
                 state=state, step=5, value=float("nan"), message=message, dedup_key=key)


def commands(settings: Settings) -> list[tuple[bytes, StopCommand]]:
    consumer = open_consumer(settings, "reader", [settings.topic(CONTROL)])
    try:
        return [(r.key, decode(r.value)) for r in consumer.poll(100, 0.5)]
    finally:
        consumer.close()


def run_events(settings: Settings) -> list:
    consumer = open_consumer(settings, "reader", [settings.topic("events")])
    try:
        return [decode(r.value) for r in consumer.poll(1000, 1.0)]
    finally:
        consumer.close()


@pytest.fixture
def sink(local_settings):
    sink = StopSwitchSink(local_settings, opted_in={"run-1": True, "run-2": False}.get)
    yield sink
    sink.close()


def test_accepts_only_firing_block_alerts_of_runs_that_opted_in(sink):
    assert sink.accepts(alert())
    assert not sink.accepts(alert(state="resolved"))
    assert not sink.accepts(alert(severity="critical"))
    assert not sink.accepts(alert("run-2"))  # did not opt in
    assert not sink.accepts(alert("run-unknown"))  # not stored: never opted in


def test_stop_severities_are_configurable(local_settings):
    settings = local_settings.model_copy(update={"stop_switch_severities": ("critical", "block")})
    sink = StopSwitchSink(settings, opted_in=lambda run_id: True)
    assert sink.accepts(alert(severity="critical")) and not sink.accepts(alert(severity="warning"))


def test_deliver_publishes_one_command_keyed_by_run(sink, local_settings):
    sink.deliver(alert())
    ((key, command),) = commands(local_settings)  # flushed before deliver returned
    assert key == b"run-1"
    assert (command.run_id, command.experiment, command.team, command.rule, command.step, command.dedup_key) == (
        "run-1", "exp", "nlp", "loss_not_finite", 5, "run-1/nan")
    assert command.reason == "loss_not_finite: train loss is nan at step 5"


def test_a_retried_delivery_sends_the_same_command(sink, local_settings):
    sink.deliver(alert())
    sink.deliver(alert())
    first, second = (c for _, c in commands(local_settings))
    assert first.event_id == second.event_id
    assert stop_command(alert(key="other")).event_id != first.event_id


def test_a_run_that_did_not_opt_in_gets_no_command(sink, local_settings):
    sink.deliver(alert("run-2"))
    assert commands(local_settings) == []


def test_an_unanswerable_opt_in_is_a_retryable_delivery_failure(local_settings):
    def store_down(run_id):
        raise ConnectionError("store unreachable")

    sink = StopSwitchSink(local_settings, opted_in=store_down)
    assert sink.accepts(alert())  # routed, so that the failure is retried rather than the stop lost
    with pytest.raises(SinkError, match="cannot tell whether run run-1 opted in: store unreachable"):
        sink.deliver(alert())


def test_ingest_does_not_consume_the_control_topic(local_settings):
    assert local_settings.topic(CONTROL) not in event_topics(local_settings)


def publish(settings: Settings, command: StopCommand, key: bytes | None = None) -> None:
    producer = open_producer(settings)
    producer.append(settings.topic(CONTROL), key or command.run_id.encode(), encode(command))
    producer.flush(5)
    producer.close()


def listen(settings: Settings, run_id: str, since_ms: int) -> tuple[StopListener, list, threading.Event]:
    heard: list[StopCommand] = []
    done = threading.Event()

    def on_stop(command):
        heard.append(command)
        done.set()

    return StopListener(settings, run_id, poll_seconds=0.1).start(since_ms, on_stop), heard, done


def test_the_listener_acts_only_on_its_runs_commands_issued_after_it_started(local_settings):
    publish(local_settings, stop_command(alert("run-1", key="before")))
    since_ms = now_ms() + 1  # after "before" was appended
    while now_ms() < since_ms:
        time.sleep(0.001)
    listener, heard, done = listen(local_settings, "run-1", since_ms)
    publish(local_settings, stop_command(alert("run-9", key="other run")))
    publish(local_settings, stop_command(alert("run-9", key="misrouted")), key=b"run-1")
    publish(local_settings, stop_command(alert("run-1", key="after")))
    assert done.wait(WAIT)
    listener.stop()
    assert [c.dedup_key for c in heard] == ["after"]


def test_the_listener_skips_unreadable_records(local_settings):
    listener, heard, done = listen(local_settings, "run-1", 0)
    producer = open_producer(local_settings)
    producer.append(local_settings.topic(CONTROL), b"run-1", b"not avro")
    producer.flush(5)
    publish(local_settings, stop_command(alert("run-1")))
    assert done.wait(WAIT)
    listener.stop()
    assert [c.dedup_key for c in heard] == ["run-1/nan"]


def test_the_local_tail_reads_from_a_point_in_time(local_settings):
    publish(local_settings, stop_command(alert(key="old")))
    (old,) = open_tail(local_settings, local_settings.topic(CONTROL), 0, "g").poll(10, 0)
    tail = open_tail(local_settings, local_settings.topic(CONTROL), old.ts_ms + 1, "g")
    assert tail.poll(10, 0) == []
    publish(local_settings, stop_command(alert(key="new")))
    assert [decode(r.value).dedup_key for r in tail.poll(10, WAIT)] == ["new"]
    tail.close()


def deliver(settings: Settings, alert: Alert) -> None:
    sink = StopSwitchSink(settings, opted_in=lambda run_id: True)
    sink.deliver(alert)
    sink.close()


def test_an_opted_in_run_records_the_tag_stops_on_command_and_ends_stopped(local_settings):
    run = init("exp", settings=local_settings, sample_gpus=False, stop_on_block=True, tags={"team": "a"})
    assert not run.should_stop
    run.check_stop()  # no stop asked yet: nothing raised
    deliver(local_settings, alert(run.run_id))
    with pytest.raises(TrainingStopped, match="loss_not_finite: train loss is nan at step 5"):
        with run:
            for step in range(int(WAIT / 0.01)):
                run.log_step(step, loss=1.0)
                run.check_stop()
                time.sleep(0.01)
    assert run.should_stop and run.stop_reason == "loss_not_finite: train loss is nan at step 5"
    started, *_, ended = run_events(local_settings)
    assert started.tags == {"team": "a", STOP_ON_BLOCK_TAG: "true"}
    assert (ended.status, ended.error) == ("stopped", "loss_not_finite: train loss is nan at step 5")


def test_a_run_told_to_stop_that_leaves_its_loop_ends_stopped(local_settings):
    with init("exp", settings=local_settings, sample_gpus=False) as run:
        run.request_stop("operator asked")
        run.request_stop("a later reason")
    assert run_events(local_settings)[-1].status == "stopped"
    assert run_events(local_settings)[-1].error == "operator asked"


def test_a_run_told_to_stop_that_then_fails_ends_failed(local_settings):
    with pytest.raises(RuntimeError):
        with init("exp", settings=local_settings, sample_gpus=False) as run:
            run.request_stop("loss_not_finite")
            raise RuntimeError("CUDA error")
    ended = run_events(local_settings)[-1]
    assert (ended.status, ended.error) == ("failed", "RuntimeError: CUDA error")


def test_a_run_that_did_not_opt_in_is_not_tagged_and_does_not_listen(local_settings):
    run = init("exp", settings=local_settings, sample_gpus=False)
    deliver(local_settings, alert(run.run_id))
    assert not [t for t in threading.enumerate() if t.name.startswith("trainwire-control")]
    run.finish()
    started, ended = run_events(local_settings)
    assert STOP_ON_BLOCK_TAG not in started.tags
    assert (ended.status, ended.error, run.should_stop) == ("completed", None, False)
