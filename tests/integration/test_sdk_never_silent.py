"""The SDK never goes silent, end to end (issue 12, items 8–12): for each value no event can hold, a run logs it, then
valid steps, and finishes; ingest (the real consumer pipeline into chdb) stores every valid event and the run ended,
whose producer counters say what the run lost. On the local log and on the real broker (through the disk spool).

(Not named test_sdk_hardening.py: the unit tests have that file name, and pytest's rootdir-less test modules
must have unique basenames.)"""

from __future__ import annotations

import time

import pytest

from tests.sdk_values import BAD_CALLS, NOT_UTF8_PATH, NOT_UTF8_RECORDED, SHA
from trainwire.consumers.service import build_ingest
from trainwire.infra.store import connect_store
from trainwire.infra.store.read import StoreReader
from trainwire.producers import InvalidRunError, init

VALID_STEPS = range(2, 7)


def drain(settings):
    pipeline = build_ingest(settings, on_alert=lambda alert: None, group="ingest")
    assert pipeline.drain(idle_seconds=2.0, deadline=time.monotonic() + 120)
    pipeline.close()
    return pipeline


@pytest.fixture
def reader_of():
    clients = []

    def open_reader(settings) -> StoreReader:
        clients.append(connect_store(settings.store_dsn))
        return StoreReader(clients[-1])

    yield open_reader
    for client in clients:
        client.close()


def test_each_bad_value_loses_its_own_event_and_nothing_else(any_settings, reader_of):
    settings = any_settings.model_copy(update={"heartbeat_seconds": 0.2})
    runs = {}
    for name, call in BAD_CALLS.items():  # one run per value, all in this process: one sender for them all
        run = init("never-silent", name, {"lr": 1e-4}, settings=settings, sample_gpus=False)
        call(run)
        for step in VALID_STEPS:
            run.log_step(step, loss=1.0 / step, learning_rate=1e-4)
        run.log_eval(6, eval_loss=0.4)
        runs[name] = run
    time.sleep(0.5)  # a heartbeat or two, carrying the counters
    odd_path = init("never-silent", "non-UTF-8 path", settings=settings, sample_gpus=False)
    odd_path.log_checkpoint(3, NOT_UTF8_PATH, [{"name": NOT_UTF8_PATH, "size": 10, "sha256": SHA}])
    odd_path.log_step(3, loss=0.5)
    assert odd_path.finish()
    for run in runs.values():
        assert run.finish()
    drain(settings)
    reader = reader_of(settings)

    for name, run in runs.items():
        counts = reader.event_counts([run.run_id])
        assert counts["run_started"] == counts["run_ended"] == 1, name
        assert counts["steps"] == len(VALID_STEPS) and counts["evals"] == 1, name
        assert reader.events_stored([run.run_id]) == run.events_emitted - 1, name  # all but the bad one
        assert [s["step"] for s in reader.steps(run.run_id)] == list(VALID_STEPS), name
        ended = ended_row(reader, run.run_id)
        assert ended["status"] == "completed" and ended["events_invalid"] == 1 and ended["events_dropped"] == 0
        assert ended["completed_steps"] == 6 and ended["final_loss"] == 1.0 / 6, name
        summary = reader.run_summary(run.run_id)
        assert summary["status"] == "completed" and summary["events_invalid"] == 1, name
        assert summary["events_dropped"] == 0, name
        beats = heartbeat_rows(reader, run.run_id)
        assert beats and beats[-1]["events_invalid"] == 1, name
        if settings.kafka:  # spooled before the broker: the spool's backlog and size are reported
            assert ended["events_spooled"] is not None and ended["spool_bytes"] > 0
        else:
            assert ended["events_spooled"] is None and ended["spool_bytes"] is None

    [checkpoint] = reader.checkpoints(odd_path.run_id)
    assert checkpoint["path"] == NOT_UTF8_RECORDED and checkpoint["files"][0]["name"] == NOT_UTF8_RECORDED
    assert ended_row(reader, odd_path.run_id)["events_invalid"] == 0


def test_events_dropped_on_a_full_queue_are_counted_in_the_stored_run_ended(any_settings, reader_of):
    settings = any_settings.model_copy(update={"queue_size": 5})
    run = init("never-silent", "full queue", settings=settings, sample_gpus=False)
    for step in range(1, 2_001):
        run.log_step(step, loss=1.0)
    assert run.events_dropped > 0
    assert run.finish()  # its run ended waits for room: it is never the one dropped
    drain(settings)
    reader = reader_of(settings)
    ended = ended_row(reader, run.run_id)
    assert ended["events_dropped"] == run.events_dropped and ended["events_invalid"] == 0
    assert reader.event_counts([run.run_id])["steps"] == 2_000 - run.events_dropped
    assert reader.events_stored([run.run_id]) == run.events_emitted


def test_a_refused_init_sends_nothing_and_the_next_run_is_stored(any_settings, reader_of):
    for bad in ({"lerning_rate": 2e-4}, {"experiment": "  "}, {"seed": 2**64}, {"tags": {"x": "\ud800"}}):
        with pytest.raises(InvalidRunError):
            init(**{"experiment": "never-silent", **bad}, settings=any_settings, sample_gpus=False)
    with init("never-silent", "after refusals", settings=any_settings, sample_gpus=False) as run:
        run.log_step(1, loss=1.0)
    drain(any_settings)
    reader = reader_of(any_settings)
    assert [r["run_id"] for r in reader.runs()] == [run.run_id]
    assert reader.run_summary(run.run_id)["status"] == "completed"


def ended_row(reader: StoreReader, run_id: str) -> dict:
    return reader._rows("SELECT * FROM run_ended FINAL WHERE run_id = {run_id:String}", run_id=run_id)[0]


def heartbeat_rows(reader: StoreReader, run_id: str) -> list[dict]:
    return reader._rows("SELECT * FROM heartbeats FINAL WHERE run_id = {run_id:String} ORDER BY ts", run_id=run_id)
