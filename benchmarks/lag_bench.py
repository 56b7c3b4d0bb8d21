"""Consumer lag while many simulated jobs stream: SDK → real broker → `trainwire consume` → embedded ClickHouse.

    .venv/bin/python benchmarks/lag_bench.py [--jobs 1000] [--steps-per-s 10] [--seconds 30]

Every job logs `--steps-per-s` steps a second (one driver thread paces them all); the consumer runs as its own
process and its lag is read from its Prometheus endpoint every second. Writes benchmarks/results/lag.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result  # noqa: E402

from trainwire.infra.config import Settings  # noqa: E402
from trainwire.infra.log import ensure_topics  # noqa: E402
from trainwire.producers import init  # noqa: E402
from trainwire.producers.session import close_all  # noqa: E402


def metric(port: int, name: str) -> float | None:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return None
    return next((float(line.split()[1]) for line in text.splitlines() if line.startswith(name + " ")), None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kafka", default="127.0.0.1:9092")
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--steps-per-s", type=float, default=10)
    parser.add_argument("--seconds", type=int, default=30)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as home, socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        settings = Settings(home=Path(home), kafka=args.kafka, topic_prefix=f"lag-{uuid.uuid4().hex[:6]}.",
                            heartbeat_seconds=600, queue_size=1_000_000)
        ensure_topics(settings, [settings.topic("events"), settings.topic("gpu")])
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("TRAINWIRE_")},
               "TRAINWIRE_HOME": str(Path(home) / "consumer"), "TRAINWIRE_KAFKA": args.kafka,
               "TRAINWIRE_TOPIC_PREFIX": settings.topic_prefix}
        consumer = subprocess.Popen([sys.executable, "-m", "trainwire", "consume", "--metrics-port", str(port),
                                     "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        runs = [init("lag", f"job-{i}", settings=settings, sample_gpus=False) for i in range(args.jobs)]
        curve, step, started = [], 0, time.monotonic()
        interval = 1.0 / args.steps_per_s
        next_sample = started
        while time.monotonic() - started < args.seconds:
            step += 1
            tick = time.monotonic()
            for run in runs:
                run.log_step(step, loss=2.0 / step, learning_rate=1e-4, grad_norm=1.0, tokens_per_s=3000.0)
            if time.monotonic() >= next_sample:
                curve.append({"t": round(time.monotonic() - started, 1), "logged": step * args.jobs,
                              "lag": metric(port, "trainwire_ingest_lag"),
                              "stored": metric(port, "trainwire_ingest_stored_total")})
                print(curve[-1], file=sys.stderr)
                next_sample += 1.0
            time.sleep(max(0.0, interval - (time.monotonic() - tick)))
        for run in runs:
            run.finish()
        produced = sum(run.events_emitted for run in runs)
        close_all()
        drain_started = time.monotonic()
        while (metric(port, "trainwire_ingest_stored_total") or 0) < produced and time.monotonic() - drain_started < 300:
            time.sleep(0.5)
        caught_up = round(time.monotonic() - drain_started, 1)
        consumer.terminate()
        stats = json.loads(consumer.communicate(timeout=60)[0])
    offered = args.jobs * args.steps_per_s
    result = {"kafka": args.kafka, "jobs": args.jobs, "offered_events_per_s": offered,
              "achieved_log_rate_per_s": round(step * args.jobs / args.seconds), "events_produced": produced,
              "events_stored": stats["stored"], "seconds_to_catch_up_after_stop": caught_up, "lag_curve": curve}
    print(json.dumps({k: v for k, v in result.items() if k != "lag_curve"}, indent=2))
    write_result("lag", result)


if __name__ == "__main__":
    main()
