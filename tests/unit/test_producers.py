import logging
import math
import threading
import time

from trainwire.infra.log import LogProducer, open_consumer
from trainwire.producers import init
from trainwire.producers.emitter import Emitter
from trainwire.producers.gpu import GpuSampler, visible_indices
from trainwire.producers.simulate import SimulatedGpus
from trainwire.schemas import Step, decode


class StuckProducer(LogProducer):
    """A transport that never returns from append: the broker hangs."""

    def __init__(self):
        self.release = threading.Event()

    def append(self, topic, key, value):
        self.release.wait()

    def flush(self, timeout):
        return 0

    def close(self):
        self.release.set()


def test_log_step_never_blocks_when_the_transport_hangs():
    producer = StuckProducer()
    emitter = Emitter(producer, lambda name: name, queue_size=100)
    fields = {"run_id": "r", "experiment": "e", "seq": 0, "step": 1, "loss": 1.0}
    started = time.perf_counter()
    accepted = [emitter.submit(Step, dict(fields)) for _ in range(1_000)]
    assert time.perf_counter() - started < 1.0
    assert sum(accepted) <= 101 and emitter.dropped == 1_000 - sum(accepted)
    producer.release.set()
    emitter.close(5)


def test_run_events_reach_the_log_in_order(local_settings):
    with init("unit", "ordered", {"lr": 0.1}, settings=local_settings, sample_gpus=False) as run:
        for step in range(1, 51):
            run.log_step(step, loss=1.0 / step, learning_rate=0.1, grad_norm=math.nan)
        run.log_eval(50, eval_loss=0.5)
    consumer = open_consumer(local_settings, "g", [local_settings.topic("events")])
    events = [decode(r.value) for r in consumer.poll(1000, 2.0)]
    assert [e.kind for e in events] == ["run_started"] + ["step"] * 50 + ["eval", "run_ended"]
    first = events[0].seq
    assert [e.seq for e in events] == list(range(first, first + 53))
    assert events[-1].status == "completed" and events[-1].final_loss == 1.0 / 50
    assert math.isclose(events[-2].perplexity, math.exp(0.5))
    assert run.events_emitted == 53


def test_invalid_values_are_counted_not_raised(local_settings):
    run = init("unit", "bad", settings=local_settings, sample_gpus=False)
    run.log_step(-1, loss=1.0)  # a negative step is refused by validation on the sender thread
    assert run.finish()
    assert run._emitter.invalid == 1


def test_exception_in_the_block_ends_the_run_failed(local_settings):
    try:
        with init("unit", "crash", settings=local_settings, sample_gpus=False) as run:
            raise RuntimeError("CUDA out of memory")
    except RuntimeError:
        pass
    consumer = open_consumer(local_settings, "g", [local_settings.topic("events")])
    ended = decode(consumer.poll(100, 2.0)[-1].value)
    assert ended.status == "failed" and ended.error == "RuntimeError: CUDA out of memory"
    assert ended.run_id == run.run_id


def test_visible_devices():
    assert visible_indices(4, None) == [0, 1, 2, 3]
    assert visible_indices(4, "2,0") == [2, 0]
    assert visible_indices(4, "") == []
    assert visible_indices(2, "1,5") == [1]
    assert visible_indices(2, "GPU-abc") == [0, 1]


def test_no_gpu_means_no_samples_and_one_note(caplog, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    emitted = []
    with caplog.at_level(logging.INFO, logger="trainwire"):
        started = GpuSampler(lambda **s: emitted.append(s), interval=0.01).start()
    assert started is False and emitted == []
    notes = [r for r in caplog.records if "no GPU samples" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.INFO


def test_sampler_reads_every_gpu_each_interval():
    emitted = []
    sampler = GpuSampler(lambda **s: emitted.append(s), interval=0.02, rank=3, source=SimulatedGpus(count=2))
    assert sampler.start()
    time.sleep(0.15)
    sampler.stop()
    assert len(emitted) >= 4 and {s["gpu_index"] for s in emitted} == {0, 1}
    assert all(s["rank"] == 3 and s["memory_total_mb"] == 81_920.0 for s in emitted)
