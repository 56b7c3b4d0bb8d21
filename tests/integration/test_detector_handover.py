"""Detector state survives a new consumer: a second pipeline (new engine) on the same store and transport
continues a run mid-incident without firing it again, and still resolves it."""

import math

from trainwire.consumers.detectors import HistoryRequest, StoreHistory
from trainwire.consumers.service import build_ingest
from trainwire.infra.log import open_producer
from trainwire.infra.log.topics import topic_for
from trainwire.infra.store import connect_store
from trainwire.infra.store.read import StoreReader
from trainwire.schemas import GpuSample, RunEnded, RunStarted, Step, encode

RUN = "run-handover"


class Run:
    """A run's events, numbered like the SDK numbers them."""

    def __init__(self, run_id=RUN):
        self.run_id = run_id
        self.seq = 0

    def __call__(self, event_type, **fields):
        event = event_type(run_id=self.run_id, experiment="it", host="node-1", seq=self.seq, **fields)
        self.seq += 1
        return event

    def steps(self, first, losses):
        return [self(Step, step=first + i, loss=loss, grad_norm=1.0) for i, loss in enumerate(losses)]

    def gpu(self, temperature):
        return self(GpuSample, gpu_index=0, gpu_uuid="GPU-0", temperature_c=temperature)


def send(settings, events):
    producer = open_producer(settings)
    for event in events:
        producer.append(settings.topic(topic_for(event.kind)), event.run_id.encode(), encode(event))
    assert producer.flush(30) == 0
    producer.close()


def consume(settings):
    published = []
    pipeline = build_ingest(settings, on_alert=published.append)
    pipeline.drain(idle_seconds=2.0)
    pipeline.close()
    return published


def test_a_new_consumer_continues_open_incidents(any_settings):
    run = Run()
    learning = [1.0 + math.exp(-i / 4) for i in range(20)]
    send(any_settings, [run(RunStarted), *run.steps(1, learning), run.gpu(90.0), *run.steps(21, [math.nan] * 5)])
    first = consume(any_settings)
    assert {(a.rule, a.state) for a in first} == {("loss_not_finite", "firing"), ("gpu_temperature_high", "firing")}

    part_two = [*run.steps(26, [math.nan] * 5), *run.steps(31, [1.0, 1.7]), *[run.gpu(60.0) for _ in range(3)],
                run(RunEnded, status="completed")]
    send(any_settings, part_two)
    second = consume(any_settings)  # a new pipeline: its engine has never seen the run

    assert sorted((a.rule, a.state, a.step or 0) for a in second) == [  # GPU samples have their own topic: any order
        ("gpu_temperature_high", "resolved", 0),
        ("loss_not_finite", "resolved", 31),  # not fired again at step 26
        ("loss_spike", "firing", 32),  # against the baseline that part one logged
    ]
    reader = StoreReader(connect_store(any_settings.store_dsn))
    stored = [(a["rule"], a["state"], a["dedup_key"]) for a in reader.alerts(RUN) if a["rule"] == "loss_not_finite"]
    key = f"{RUN}/loss_not_finite/21"
    assert sorted(stored) == [("loss_not_finite", "firing", key), ("loss_not_finite", "resolved", key)]

    # What a consumer replaying part two after a crash would read: only what precedes its first event, though
    # the store already holds part two and the alerts it raised.
    boundary = part_two[0]
    history = StoreHistory(reader._client)(HistoryRequest(RUN, "node-1", boundary.seq, boundary.ts_ms, steps=30,
                                                          first_steps=10, evals=10, checkpoints=10, gpu_samples=5))
    assert max(record["seq"] for _, record in history.events) < boundary.seq
    assert [record["step"] for kind, record in history.events if kind == "step"][-1] == 25
    assert history.open_incidents == {"loss_not_finite": key,
                                      "gpu_temperature_high": f"{RUN}/gpu_temperature_high/node-1@21"}


def test_runs_met_under_way_after_a_restart_are_rebuilt_with_one_batched_load(local_settings, monkeypatch):
    runs = [Run(f"run-{i}") for i in range(6)]
    send(local_settings, [e for run in runs for e in [run(RunStarted), *run.steps(1, [1.0] * 10 + [math.nan] * 3)]])
    assert len(consume(local_settings)) == 6  # one loss_not_finite incident per run

    loads = []
    load_many = StoreHistory.load_many
    monkeypatch.setattr(StoreHistory, "load_many", lambda self, requests: loads.append(len(requests))
                        or load_many(self, requests))
    send(local_settings, [e for run in runs for e in run.steps(14, [math.nan, 1.0, 1.0])])
    second = consume(local_settings)

    assert loads == [6]  # the six runs under way: one load, not six
    assert sorted((a.run_id, a.rule, a.state, a.step) for a in second) == [
        (run.run_id, "loss_not_finite", "resolved", 15) for run in runs]  # none fired twice


def test_an_incident_the_detectors_did_not_raise_is_never_adopted(local_settings):
    """A firing alert that reached the alerts table some other way (written by hand, or forged) must not pass
    for the run's open incident: the next real NaN still pages."""
    from trainwire.consumers.rows import to_row
    from trainwire.consumers.writer import ClickHouseWriter
    from trainwire.schemas import Alert

    run = Run("run-forged")
    send(local_settings, [run(RunStarted), *run.steps(1, [1.0] * 5)])
    consume(local_settings)
    forged = Alert(run_id=run.run_id, experiment="it", rule="loss_not_finite", severity="critical", state="firing",
                   dedup_key=f"{run.run_id}/loss_not_finite/3", message="forged", ts_ms=1)
    client = connect_store(local_settings.store_dsn)
    ClickHouseWriter(client).write({"alert": [to_row("alert", forged.model_dump())]})
    client.close()

    send(local_settings, run.steps(6, [math.nan]))
    published = consume(local_settings)  # a new engine: it rebuilds the run from the store
    assert [(a.rule, a.state, a.step) for a in published] == [("loss_not_finite", "firing", 6)]


def test_the_store_tells_a_new_consumer_that_a_run_has_ended_unless_it_was_resumed(local_settings):
    from trainwire.schemas import Eval

    run = Run("run-ended")
    started = [run(RunStarted), *run.steps(1, [1.0, 0.9])]
    ended = run(RunEnded, status="completed")
    send(local_settings, [*started, ended])
    consume(local_settings)
    client = connect_store(local_settings.store_dsn)
    history = StoreHistory(client)

    def ended_before(event) -> bool:
        return history(HistoryRequest(run.run_id, "node-1", event.seq, event.ts_ms, steps=5, first_steps=5, evals=5,
                                      checkpoints=5, gpu_samples=5)).ended

    post_training = run(Eval, step=2, eval_loss=0.95, ts_ms=ended.ts_ms + 1_000)
    assert ended_before(post_training)
    resumed = run(RunStarted, ts_ms=ended.ts_ms + 2_000)
    send(local_settings, [resumed])
    consume(local_settings)
    assert not ended_before(run(Step, step=3, loss=0.9, ts_ms=ended.ts_ms + 3_000))
    assert not ended_before(run(Step, step=1, loss=1.0, ts_ms=ended.ts_ms - 60_000))  # before the end: running
    client.close()
