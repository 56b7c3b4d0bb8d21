"""The SDK never goes silent (issue 12, items 8–12): a value that cannot be an event drops that event alone (counted,
logged once per kind of error), the sender outlives any exception, `init` refuses what it cannot record before
training starts, and a run's heartbeats and run ended carry what it lost."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import threading

import pytest

from trainwire.infra.log import LogProducer, open_consumer
from trainwire.producers import InvalidRunError, Run, init
from trainwire.producers.emitter import Emitter, spool_backlog
from trainwire.producers.tally import RunTally
from trainwire.producers.values import representable
from trainwire.schemas import Checkpoint, Heartbeat, RunEnded, Step, decode
from trainwire.schemas.events import new_id

from tests.sdk_values import BAD_CALLS, NOT_UTF8_PATH, NOT_UTF8_RECORDED, SHA

class MemoryProducer(LogProducer):
    """Keeps what it is given; `fail_next` makes the next appends raise (a transport refusing a message)."""

    def __init__(self):
        self.messages: list[tuple[str, bytes, bytes]] = []
        self.fail_next = 0

    def append(self, topic, key, value):
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("transport refused the message")
        self.messages.append((topic, key, value))

    def flush(self, timeout):
        return 0

    def events(self):
        return [decode(value) for _, _, value in self.messages]


class StuckProducer(MemoryProducer):
    def __init__(self):
        super().__init__()
        self.release = threading.Event()

    def append(self, topic, key, value):
        self.release.wait()
        super().append(topic, key, value)


@pytest.fixture
def emitter():
    producer = MemoryProducer()
    emitter = Emitter(producer, lambda name: name, queue_size=10_000)
    yield emitter
    emitter.close(5)


def memory_run(emitter, **kwargs) -> Run:
    return Run(emitter, experiment="unit", sample_gpus=False, heartbeat_seconds=3600, **kwargs).start({"lr": 0.1})


def events_of(emitter) -> list:
    assert emitter.flush(10)
    return emitter._producer.events()


@pytest.mark.parametrize("case", BAD_CALLS)
def test_a_bad_value_drops_its_event_alone_and_the_run_still_ends(emitter, case):
    run = memory_run(emitter)
    BAD_CALLS[case](run)  # never raises
    for step in range(2, 5):
        run.log_step(step, loss=1.0 / step)
    assert run.finish()
    events = events_of(emitter)
    assert [e.kind for e in events] == ["run_started", "step", "step", "step", "run_ended"]
    ended = events[-1]
    assert ended.status == "completed" and ended.events_invalid == 1 and ended.events_dropped == 0
    assert ended.final_loss == 0.25 and ended.completed_steps == 4
    assert run.events_invalid == emitter.invalid == 1 and emitter._thread.is_alive()


def test_every_bad_value_in_one_run_then_every_run_of_the_process_goes_on(emitter):
    bad, good = memory_run(emitter), memory_run(emitter)
    for call in BAD_CALLS.values():
        call(bad)
        good.log_step(1, loss=0.5)
    bad.log_step(10, loss=2.0)
    assert bad.finish() and good.finish()
    events = events_of(emitter)
    by_run = {run.run_id: [e for e in events if e.run_id == run.run_id] for run in (bad, good)}
    assert [e.kind for e in by_run[bad.run_id]] == ["run_started", "step", "run_ended"]
    assert by_run[bad.run_id][-1].events_invalid == len(BAD_CALLS) == bad.events_invalid
    assert by_run[bad.run_id][-1].completed_steps == 10 and by_run[bad.run_id][-1].initial_loss == 2.0
    assert [e.kind for e in by_run[good.run_id]] == ["run_started"] + ["step"] * len(BAD_CALLS) + ["run_ended"]
    assert by_run[good.run_id][-1].events_invalid == 0


def test_each_kind_of_error_is_logged_once(emitter, caplog):
    run = memory_run(emitter)
    with caplog.at_level(logging.ERROR, logger="trainwire.producers.emitter"):
        for _ in range(5):
            run.log_step(2**63)
            run.log_step(1, **{"\ud800": 1.0})
        run.log_step(1, loss="abc")
        assert emitter.flush(10)
    assert run.events_invalid == 11
    dropped = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(dropped) == 3, dropped
    assert any("step: less_than_equal" in m for m in dropped) and any("UnicodeEncodeError" in m for m in dropped)


class ExplodingCodec:
    """A codec with a bug: any exception from encoding must not kill the sender."""

    def __init__(self):
        self.explode = 1

    def encode(self, event):
        if self.explode:
            self.explode -= 1
            raise ZeroDivisionError("a bug in a codec")
        from trainwire.schemas import encode
        return encode(event)

    def decode_record(self, data):
        raise NotImplementedError


def test_the_sender_survives_codec_and_transport_exceptions():
    producer = MemoryProducer()
    emitter = Emitter(producer, lambda name: name, queue_size=100, codec=ExplodingCodec())
    counters = RunTally()
    fields = {"run_id": "r", "experiment": "e", "step": 1, "loss": 1.0}
    emitter.submit(Step, {**fields, "seq": 0}, counters)  # the codec raises
    assert emitter.flush(5)
    producer.fail_next = 1
    emitter.submit(Step, {**fields, "seq": 1}, counters)  # the transport raises
    emitter.submit(Step, {**fields, "seq": 2}, counters)
    assert emitter.flush(5)
    assert [e.seq for e in producer.events()] == [2]
    assert counters.invalid == 1 and counters.dropped == 1 and emitter._thread.is_alive()
    emitter.close(5)


def test_a_non_utf8_checkpoint_path_is_recorded_with_escapes(emitter, tmp_path):
    run = memory_run(emitter)
    run.log_checkpoint(5, NOT_UTF8_PATH, [{"name": os.fsdecode(b"w\xe9ights.bin"), "size": 3, "sha256": SHA}])
    run.log_checkpoint(6, tmp_path / os.fsdecode(b"\xff"), [])
    run.log_checkpoint(7, b"/ckpt/\xff", [])
    run.finish(artifacts=[{"name": NOT_UTF8_PATH, "size": 1, "sha256": SHA}])
    events = events_of(emitter)
    checkpoints = [e for e in events if isinstance(e, Checkpoint)]
    assert [c.path for c in checkpoints] == [NOT_UTF8_RECORDED, f"{tmp_path}/\\xff", "/ckpt/\\xff"]
    assert checkpoints[0].files[0].name == "w\\xe9ights.bin"
    assert events[-1].artifacts[0].name == NOT_UTF8_RECORDED and run.events_invalid == 0


def test_representable_keeps_utf8_and_escapes_the_rest():
    assert representable("/plain/ścieżka") == "/plain/ścieżka"
    assert representable(os.fsdecode("/ścieżka/".encode() + b"\xff")) == "/ścieżka/\\xff"
    assert representable("lone \ud800") == "lone \\ud800"
    assert representable(b"/b/\xff") == "/b/\\xff"


def test_log_calls_never_raise_on_values_of_the_wrong_type(emitter):
    run = memory_run(emitter)
    run.log_step(None, loss=object())
    run.log_eval(object(), eval_loss=[1.0], eval_accuracy="high")
    run.log_checkpoint(1, object(), files="not a list", eval_loss="low")
    run.log_checkpoint(1, "/ckpt", files=[42], eval_loss=float("nan"))
    run.log_gpu(gpu_index="zero", gpu_uuid=None)
    run.log_gpu()
    assert run.finish()
    events = events_of(emitter)
    assert [e.kind for e in events] == ["run_started", "run_ended"]
    assert events[-1].events_invalid == run.events_invalid == 6


def test_finish_leaves_out_summary_values_it_cannot_hold(emitter, caplog):
    run = memory_run(emitter)
    run.log_step(3, loss=0.5)
    with caplog.at_level(logging.WARNING):
        assert run.finish("completed", error="bad \ud800 byte", completed_steps=2**64, epochs="many",
                          artifacts=[{"name": "ok", "size": 1, "sha256": SHA},
                                     {"name": "huge", "size": 2**64, "sha256": SHA}])
    ended = events_of(emitter)[-1]
    assert isinstance(ended, RunEnded) and ended.status == "completed" and ended.error == "bad \\ud800 byte"
    assert ended.completed_steps == 3 and ended.epochs is None and [a.name for a in ended.artifacts] == ["ok"]  # the last step sent
    assert "completed_steps" in caplog.text and "artifacts[1]" in caplog.text


def test_the_summary_comes_from_the_events_that_were_sent(emitter):
    run = memory_run(emitter)
    run.log_step(1, loss=9.0, tokens=2**70)  # refused: its loss is no run's first loss
    run.log_step(2, loss=3.0)
    run.log_eval(2, eval_loss=0.9)
    run.log_eval(3, eval_loss=0.1, eval_accuracy="high")  # refused: not the best eval
    run.log_checkpoint(2, "/ckpt/2", eval_loss=0.9)
    run.log_step(5, loss=1.0)
    run.log_step(2**63, loss=0.5)  # refused: not the last step
    run.log_eval(5, eval_loss=0.95)
    run.log_checkpoint(5, "/ckpt/5", eval_loss=0.95)
    assert run.finish()
    events = events_of(emitter)
    checkpoints = [e for e in events if isinstance(e, Checkpoint)]
    assert [(c.path, c.is_best) for c in checkpoints] == [("/ckpt/2", True), ("/ckpt/5", False)]
    ended = events[-1]
    assert (ended.completed_steps, ended.initial_loss, ended.final_loss) == (5, 3.0, 1.0)
    assert (ended.best_eval_loss, ended.best_checkpoint, ended.events_invalid) == (0.9, "/ckpt/2", 3)


def test_finish_takes_arguments_of_the_wrong_type_and_still_ends_the_run(emitter):
    run = memory_run(emitter)
    assert run.finish("failed", error=RuntimeError("boom"), artifacts=5, epochs=float("nan"))
    ended = events_of(emitter)[-1]
    assert ended.status == "failed" and ended.error == "boom" and ended.artifacts == []


def test_finish_refuses_an_unknown_status_and_can_still_end_the_run(emitter):
    run = memory_run(emitter)
    with pytest.raises(InvalidRunError, match="status"):
        run.finish("done")
    assert run.finish("completed")
    assert events_of(emitter)[-1].status == "completed"


def test_run_ended_waits_for_room_instead_of_being_dropped():
    producer = StuckProducer()
    emitter = Emitter(producer, lambda name: name, queue_size=5)
    run = Run(emitter, experiment="unit", sample_gpus=False, heartbeat_seconds=3600, flush_timeout=10).start()
    for step in range(1, 50):
        run.log_step(step, loss=1.0)
    assert run.events_dropped > 0
    threading.Timer(0.3, producer.release.set).start()
    assert run.finish()
    ended = producer.events()[-1]
    assert isinstance(ended, RunEnded) and ended.events_dropped == run.events_dropped
    emitter.close(5)


def test_heartbeats_carry_the_counters_and_the_spool_backlog(tmp_path):
    producer = MemoryProducer()
    producer.undelivered = lambda: 42
    (tmp_path / "host-1-1.db").write_bytes(b"x" * 1000)
    (tmp_path / "host-1-1.db-wal").write_bytes(b"x" * 24)
    (tmp_path / "host-1-1.db.lock").write_bytes(b"x" * 7)  # not spooled data
    emitter = Emitter(producer, lambda name: name, queue_size=100, backlog=spool_backlog(producer, tmp_path))
    run = Run(emitter, experiment="unit", sample_gpus=False, heartbeat_seconds=0.05).start()
    run.log_step(2**63)
    threading.Event().wait(0.4)
    run.finish()
    emitter.close(5)
    beats = [e for e in producer.events() if isinstance(e, Heartbeat)]
    assert beats and beats[-1].events_invalid == 1 and beats[-1].events_dropped == 0
    assert (beats[-1].events_spooled, beats[-1].spool_bytes) == (42, 1024)
    assert (producer.events()[-1].events_spooled, producer.events()[-1].spool_bytes) == (42, 1024)


def test_the_local_log_has_no_spool_to_report(local_settings):
    with init("unit", "local", settings=local_settings, sample_gpus=False) as run:
        run.log_step(1, loss=1.0)
    consumer = open_consumer(local_settings, "g", [local_settings.topic("events")])
    ended = decode(consumer.poll(100, 2.0)[-1].value)
    assert (ended.events_dropped, ended.events_invalid, ended.events_spooled, ended.spool_bytes) == (0, 0, None, None)


# --- init checks what it is given, on the caller's thread, before anything is sent -----------------------------

@pytest.mark.parametrize("arguments, names, says", [
    ({"lerning_rate": 2e-4}, ("lerning_rate",), "unexpected keyword argument 'lerning_rate'"),
    ({"experiment": "  "}, ("experiment",), "experiment: .*must not be blank"),
    ({"experiment": ""}, ("experiment",), "experiment"),
    ({"run_id": "   "}, ("run_id",), "run_id"),
    ({"seed": 2**64}, ("seed",), "seed: Input should be less than or equal"),
    ({"total_steps": -1}, ("total_steps",), "total_steps"),
    ({"tags": {"ticket": "ML-\ud800"}}, ("tags",), "tags: cannot be encoded"),
    ({"run_name": "x\udcff"}, ("run_name",), "run_name: cannot be encoded"),
    ({"rank": 70_000}, ("rank",), "rank"),
    ({"config": {1: "a", "b": 2}}, ("config",), "config"),
    ({"config": 3.5}, ("config",), "config"),
    ({"world_size": 0}, ("world_size",), "world_size"),
    ({"dataset_samples": "many"}, ("dataset_samples",), "dataset_samples"),
])
def test_init_refuses_what_it_cannot_record(local_settings, arguments, names, says):
    arguments = {"experiment": "unit", **arguments}
    with pytest.raises(InvalidRunError, match=says) as raised:
        init(settings=local_settings, sample_gpus=False, **arguments)
    assert raised.value.fields == names and isinstance(raised.value, ValueError)
    consumer = open_consumer(local_settings, "g", [local_settings.topic("events")])
    assert consumer.poll(10, 0.2) == []  # nothing was sent


def test_init_suggests_the_field_a_keyword_was_misspelt_from(local_settings):
    with pytest.raises(InvalidRunError, match="did you mean 'dataset_license'"):
        init("unit", settings=local_settings, sample_gpus=False, dataset_lisence="mit")


@pytest.mark.parametrize("interval", ["heartbeat_seconds", "gpu_interval"])
@pytest.mark.parametrize("seconds", [math.inf, 1e12, math.nan, 0, -1])
def test_a_run_refuses_an_interval_its_threads_cannot_wait(emitter, interval, seconds):
    with pytest.raises(InvalidRunError, match=interval):
        Run(emitter, experiment="unit", sample_gpus=False, **{interval: seconds})


# --- event ids: no user code can seed them --------------------------------------------------------------------

IDS_AFTER_SEED = "import random; from trainwire.schemas.events import new_id; random.seed(42); " \
                 "print(' '.join(new_id() for _ in range(5)))"


def test_ids_differ_between_processes_that_seed_random_alike():
    ids = [subprocess.run([sys.executable, "-c", IDS_AFTER_SEED], capture_output=True, text=True, check=True)
           .stdout.split() for _ in range(2)]
    assert len(ids[0]) == 5 and not set(ids[0]) & set(ids[1])


def test_a_forked_child_makes_ids_other_than_its_parents():
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        os.close(read)
        os.write(write, " ".join(new_id() for _ in range(5)).encode())
        os._exit(0)
    os.close(write)
    parent = [new_id() for _ in range(5)]
    with os.fdopen(read) as pipe:
        child = pipe.read().split()
    os.waitpid(pid, 0)
    assert len(child) == 5 and not set(child) & set(parent)


# --- the Hugging Face callback: what it gathered itself never stops training; what the caller gave is refused ----

class FakeArgs:
    run_name, process_index, world_size, output_dir = None, 0, 1, "/tmp/out"

    def to_dict(self):
        return {"learning_rate": 2e-4}


def test_the_callback_leaves_out_a_gathered_field_run_started_cannot_hold(local_settings, caplog):
    pytest.importorskip("transformers")
    from trainwire.producers.hf_callback import TrainwireCallback

    callback = TrainwireCallback("unit", settings=local_settings, sample_gpus=False, dataset_license="mit")
    gathered = {"seed": 2**64, "gpu_type": "H100 \udcff", "world_size": 1, "dataset_license": "mit"}
    with caplog.at_level(logging.WARNING):
        run = callback._start(FakeArgs(), new_id(), gathered)
    assert run.finish() and "seed" in caplog.text and "gpu_type" in caplog.text
    started = decode(open_consumer(local_settings, "g", [local_settings.topic("events")]).poll(10, 2.0)[0].value)
    assert started.seed is None and started.gpu_type is None and started.dataset_license == "mit"

    refused = TrainwireCallback("unit", settings=local_settings, sample_gpus=False, total_steps=-5)
    with pytest.raises(InvalidRunError, match="total_steps"):
        refused._start(FakeArgs(), new_id(), {"total_steps": -5})
