"""Producer benchmark: what `log_step` costs the training thread, and how many events one process delivers.

    .venv/bin/python benchmarks/producer_bench.py [--events N] [--kafka 127.0.0.1:9092] [--stall-repeats R]

Needs the real broker (infra/kafka/up). Writes benchmarks/results/producer.json. Measures:
  1. log_step on the training thread, broker up and broker unreachable (a closed port): median/p99/max, with a
     pause between calls (the sender runs meanwhile, as it does while a real step waits on the GPU).
  2. Stalls: `--steps` log_step calls back to back (the sender and the spool's forwarder work through the backlog
     meanwhile), on a null sink, the local log, the broker up and the broker unreachable, interleaved, `R` times
     each: the longest call, p99.9, calls over 5 ms and how long each waited for a CPU, the longest call that no
     full garbage collection overlapped, and the full collections that ran (on any thread: they stop all of them).
  3. Sustained SDK throughput: log_step → validate/encode → disk spool → broker acknowledgement, one process.
  4. The transport alone (already-encoded messages → spool → broker), and bare confluent-kafka produce.
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import statistics
import sys
import threading
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import percentiles, write_result  # noqa: E402
from confluent_kafka import Producer  # noqa: E402

from trainwire.infra.config import Settings  # noqa: E402
from trainwire.infra.log import ensure_topics  # noqa: E402
from trainwire.infra.log.kafka_client import producer_config  # noqa: E402
from trainwire.infra.log.spool import SpoolingProducer  # noqa: E402
from trainwire.producers import Run, init  # noqa: E402
from trainwire.producers.session import close_all  # noqa: E402
from trainwire.schemas import Step, encode  # noqa: E402


PAUSE = 0.0002  # seconds of "training" between two log_step calls


def closed_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def settings_for(bootstrap: str, home: Path, flush_timeout: float = 300) -> Settings:
    return Settings(home=home, kafka=bootstrap, topic_prefix=f"bench-{uuid.uuid4().hex[:8]}.",
                    queue_size=2_000_000, flush_timeout_seconds=flush_timeout, heartbeat_seconds=60)


class NullEmitter:
    """Accepts and drops: the same call pattern with no telemetry behind it, to show the machine's own noise."""

    def submit(self, _event_type, _fields, _tally=None, _wait=0.0) -> bool:
        return True


def time_log_steps(run, steps: int, pause: float) -> dict:
    samples = []
    for step in range(steps):
        started = time.perf_counter_ns()
        run.log_step(step, loss=1.0, learning_rate=1e-4, grad_norm=1.0, tokens_per_s=3000.0)
        samples.append((time.perf_counter_ns() - started) / 1000)
        time.sleep(pause)
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in percentiles(samples).items()}


def null_baseline(steps: int, pause: float) -> dict:
    return time_log_steps(Run(NullEmitter(), experiment="bench", sample_gpus=False), steps, pause)


def log_step_latency(bootstrap: str, steps: int, pause: float) -> dict:
    """Time each log_step call on the training thread. Between calls the thread 'trains': it sleeps, releasing
    the GIL as a real step does while it waits on the GPU, so the sender thread runs meanwhile."""
    with tempfile.TemporaryDirectory() as home:
        settings = settings_for(bootstrap, Path(home), flush_timeout=1)
        run = init("bench", "latency", settings=settings, sample_gpus=False)
        result = time_log_steps(run, steps, pause)
        close_all()  # with the broker down this leaves the events spooled on disk (then deleted with `home`)
    return result


class Collections:
    """The garbage collections that run (on any thread) while it is installed: a full one stops every thread."""

    def __init__(self):
        self.started: dict[int, int] = {}
        self.seen: list[tuple[int, str, int, int]] = []  # (generation, thread, start ns, end ns)

    def __call__(self, phase: str, info: dict) -> None:
        now = time.perf_counter_ns()
        if phase == "start":
            self.started[threading.get_ident()] = now
        elif (began := self.started.pop(threading.get_ident(), None)) is not None:
            self.seen.append((info["generation"], threading.current_thread().name, began, now))

    def full_during(self, start: int, end: int) -> bool:
        return any(gen == 2 and began < end and ended > start for gen, _, began, ended in self.seen)

    def __enter__(self):
        gc.callbacks.append(self)
        return self

    def __exit__(self, *_exc):
        gc.callbacks.remove(self)


class RunQueueWait:
    """How long this thread has waited for a CPU (Linux schedstat, ns): a call that stalled while the thread was
    runnable but not running stalled for the machine's load, not for the GIL or a garbage collection."""

    def __init__(self):
        try:
            self._fd = os.open(f"/proc/self/task/{threading.get_native_id()}/schedstat", os.O_RDONLY)
        except OSError:
            self._fd = None

    def __call__(self) -> int:
        if self._fd is None:
            return 0
        return int(os.pread(self._fd, 64, 0).split()[1])

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)


def back_to_back(run, steps: int, collect_first: bool) -> dict:
    """`steps` log_step calls with nothing between them: the longest is the worst stall of the training thread.
    `collect_first`: collect the heap before, so that the full collection a fresh process owes (since its imports)
    is not counted; a training process has paid it long before its first step."""
    if collect_first:
        gc.collect()
    waited, samples, stalls = RunQueueWait(), [], []
    with Collections() as collections:
        for step in range(steps):
            wait = waited()
            started = time.perf_counter_ns()
            run.log_step(step, loss=1.0, learning_rate=1e-4, grad_norm=1.0, tokens_per_s=3000.0)
            ended = time.perf_counter_ns()
            samples.append((ended - started) / 1e6)
            if samples[-1] > 1:
                stalls.append((samples[-1], (waited() - wait) / 1e6, started, ended))
    waited.close()
    stats = percentiles(samples)
    in_full = [took for took, _, started, ended in stalls if collections.full_during(started, ended)]
    over_5 = [(took, wait) for took, wait, _, _ in stalls if took > 5]
    full = [c for c in collections.seen if c[0] == 2]
    return {"max_ms": round(stats["max"], 2), "p999_ms": round(stats["p999"], 3), "p99_ms": round(stats["p99"], 4),
            "median_ms": round(stats["median"], 4), "calls_over_5ms": len(over_5),
            # over 5 ms even after taking off the time the thread waited for a CPU: the GIL or a collection
            "calls_over_5ms_not_waiting_for_a_cpu": sum(took - wait > 5 for took, wait in over_5),
            "stalls_ms_and_cpu_wait_ms": [[round(took, 1), round(wait, 1)] for took, wait in sorted(over_5)[-5:]],
            "max_ms_apart_from_full_collections":
                round(max([took for took, _, _, _ in stalls if took not in in_full] or [min(stats["max"], 1.0)]), 2),
            "full_collections_ms": [[thread, round((end - began) / 1e6, 2)] for _, thread, began, end in full]}


def stall_run(mode: str, kafka: str, steps: int, collect_first: bool) -> dict:
    if mode == "null":
        return back_to_back(Run(NullEmitter(), experiment="bench", sample_gpus=False), steps, collect_first)
    bootstrap = {"local log": None, "broker up": kafka, "broker down": closed_port()}[mode]
    with tempfile.TemporaryDirectory() as home:
        settings = settings_for(bootstrap, Path(home), flush_timeout=5 if mode == "broker down" else 60)
        run = init("bench", "stalls", settings=settings, sample_gpus=False)
        result = back_to_back(run, steps, collect_first)
        delivered = run.finish()
        emitted, dropped = run.events_emitted, run.events_dropped
        held = run._emitter._producer.undelivered() if mode == "broker down" else 0  # the spool's rows
        close_all()
    # nothing lost: every call queued its event, and the broker or the local log got them all, or, with the broker
    # down, the disk spool holds them all (run started, the steps, run ended)
    assert dropped == 0 and emitted == steps + 2, (emitted, dropped)
    assert delivered if mode != "broker down" else held == steps + 2, (delivered, held)
    return result


def stalls(kafka: str, steps: int, repeats: int, collect_first: bool) -> dict:
    """Each mode `repeats` times, interleaved, so that the machine's load falls on every mode alike."""
    modes = ("null", "local log", "broker up", "broker down")
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    for repeat in range(repeats):
        for mode in modes if repeat % 2 == 0 else reversed(modes):
            runs[mode].append(stall_run(mode, kafka, steps, collect_first))
            print(f"  {mode}: {runs[mode][-1]}", file=sys.stderr)
    summary = {}
    for mode, results in runs.items():
        maxima = [r["max_ms"] for r in results]
        summary[mode] = {"median_of_max_ms": round(statistics.median(maxima), 2), "max_ms": max(maxima),
                         "median_p999_ms": round(statistics.median(r["p999_ms"] for r in results), 3),
                         "median_p99_ms": round(statistics.median(r["p99_ms"] for r in results), 4),
                         "median_ms": round(statistics.median(r["median_ms"] for r in results), 4),
                         "calls_over_5ms": sum(r["calls_over_5ms"] for r in results),
                         "calls_over_5ms_not_waiting_for_a_cpu":
                             sum(r["calls_over_5ms_not_waiting_for_a_cpu"] for r in results),
                         "max_ms_apart_from_full_collections":
                             max(r["max_ms_apart_from_full_collections"] for r in results),
                         "full_collections": sum(len(r["full_collections_ms"]) for r in results), "runs": results}
    return {"steps_per_run": steps, "repeats": repeats, "heap_collected_first": collect_first,
            "load_average": [round(v, 2) for v in os.getloadavg()], **summary}


def sdk_throughput(bootstrap: str, events: int) -> dict:
    with tempfile.TemporaryDirectory() as home:
        settings = settings_for(bootstrap, Path(home))
        ensure_topics(settings, [settings.topic("events")])
        run = init("bench", "throughput", settings=settings, sample_gpus=False)
        started = time.perf_counter()
        for step in range(events):
            run.log_step(step, loss=1.0, learning_rate=1e-4, grad_norm=1.0, tokens_per_s=3000.0)
        logged = time.perf_counter() - started
        assert run._emitter.flush(300), "not all events delivered"
        elapsed = time.perf_counter() - started
        dropped = run._emitter.dropped
        close_all()
    return {"events": events, "seconds": round(elapsed, 2), "events_per_s": round(events / elapsed),
            "log_step_loop_seconds": round(logged, 2), "dropped": dropped}


def transport_throughput(bootstrap: str, events: int) -> dict:
    value = encode(Step(run_id=str(uuid.uuid4()), experiment="bench", seq=1, step=1, loss=1.0, learning_rate=1e-4,
                        grad_norm=1.0, tokens_per_s=3000.0))
    keys = [str(uuid.uuid4()).encode() for _ in range(64)]
    topic = f"bench-transport-{uuid.uuid4().hex[:8]}"
    settings = Settings(kafka=bootstrap)  # security settings from TRAINWIRE_KAFKA_* as for trainwire itself
    ensure_topics(settings, [topic])
    with tempfile.TemporaryDirectory() as home:
        producer = SpoolingProducer(settings, Path(home) / "spool")
        started = time.perf_counter()
        for i in range(events):
            producer.append(topic, keys[i % 64], value)
            if i % 5000 == 4999:
                producer.flush(0)
        assert producer.flush(300) == 0
        spooled = time.perf_counter() - started
        producer.close()
    raw = Producer(producer_config(settings))
    started = time.perf_counter()
    for i in range(events):
        while True:
            try:
                raw.produce(topic, value=value, key=keys[i % 64])
                break
            except BufferError:
                raw.poll(0.01)
        raw.poll(0)
    assert raw.flush(300) == 0
    bare = time.perf_counter() - started
    return {"events": events, "message_bytes": len(value),
            "spool_to_broker_events_per_s": round(events / spooled),
            "bare_confluent_produce_events_per_s": round(events / bare)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kafka", default="127.0.0.1:9092")
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--stall-repeats", type=int, default=5)
    parser.add_argument("--only-stalls", action="store_true", help="measure the stalls alone (part 2)")
    parser.add_argument("--keep-owed-collection", action="store_true",
                        help="do not collect the heap before the stall runs: a fresh process's first full collection "
                             "then falls among the calls, as in a script that logs right after its imports")
    parser.add_argument("--name", default="producer", help="result file name (results/<name>.json)")
    parser.add_argument("--note", default="", help="what else ran on the machine, the commit measured, …")
    args = parser.parse_args()

    result = {"kafka": args.kafka, "note": args.note, "load_average_before": [round(v, 2) for v in os.getloadavg()]}
    print("stalls: log_step back to back …", file=sys.stderr)
    result["log_step_back_to_back"] = stalls(args.kafka, args.steps, args.stall_repeats,
                                             collect_first=not args.keep_owed_collection)
    if args.only_stalls:
        print(write_result(args.name, result).read_text())
        return
    result["step_pause_s"] = PAUSE
    print("log_step on a null sink (the machine's own noise) …", file=sys.stderr)
    result["log_step_us_null_sink"] = null_baseline(args.steps, PAUSE)
    print("log_step latency, broker up …", file=sys.stderr)
    result["log_step_us_broker_up"] = log_step_latency(args.kafka, args.steps, PAUSE)
    print("log_step latency, broker unreachable …", file=sys.stderr)
    result["log_step_us_broker_down"] = log_step_latency(closed_port(), args.steps, PAUSE)
    print("SDK throughput …", file=sys.stderr)
    result["sdk_throughput"] = sdk_throughput(args.kafka, args.events)
    print("transport throughput …", file=sys.stderr)
    result["transport_throughput"] = transport_throughput(args.kafka, args.events)
    path = write_result(args.name, result)
    print(path.read_text())


if __name__ == "__main__":
    main()
