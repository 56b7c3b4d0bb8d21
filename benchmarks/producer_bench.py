"""Producer benchmark: what `log_step` costs the training thread, and how many events one process delivers.

    .venv/bin/python benchmarks/producer_bench.py [--events N] [--kafka 127.0.0.1:9092]

Needs the real broker (infra/kafka/up). Writes benchmarks/results/producer.json. Measures:
  1. log_step on the training thread, broker up and broker unreachable (a closed port): median/p99/max.
  2. Sustained SDK throughput: log_step → validate/encode → disk spool → broker acknowledgement, one process.
  3. The transport alone (already-encoded messages → spool → broker), and bare confluent-kafka produce.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import percentiles, write_result  # noqa: E402
from confluent_kafka import Producer  # noqa: E402

from trainwire.infra.config import Settings  # noqa: E402
from trainwire.infra.log import ensure_topics  # noqa: E402
from trainwire.infra.log.kafka import producer_config  # noqa: E402
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

    def submit(self, _event_type, _fields) -> bool:
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
    ensure_topics(Settings(kafka=bootstrap), [topic])
    with tempfile.TemporaryDirectory() as home:
        producer = SpoolingProducer(bootstrap, Path(home) / "spool")
        started = time.perf_counter()
        for i in range(events):
            producer.append(topic, keys[i % 64], value)
            if i % 5000 == 4999:
                producer.flush(0)
        assert producer.flush(300) == 0
        spooled = time.perf_counter() - started
        producer.close()
    raw = Producer(producer_config(bootstrap))
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
    args = parser.parse_args()

    result = {"kafka": args.kafka, "step_pause_s": PAUSE}
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
    path = write_result("producer", result)
    print(path.read_text())


if __name__ == "__main__":
    main()
