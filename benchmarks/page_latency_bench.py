"""Page latency: from `log_step` of a NaN loss to the webhook receiving the page, through the real broker.

    .venv/bin/python benchmarks/page_latency_bench.py [--jobs 1000] [--steps-per-s 2] [--seconds 60] [--nans-per-s 4]

`--jobs` simulated jobs log `--steps-per-s` healthy steps a second each (one driver thread paces them all, as in
lag_bench.py); `--nans-per-s` times a second one of them, in turn, logs a NaN loss instead. `trainwire up` runs as its
own process on Kafka and chdb (ingest, detectors, alert consumer) and pages a webhook served here, which notes when
each page arrives. Writes benchmarks/results/page_latency.json (or --name).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import percentiles, serve_webhook, write_result  # noqa: E402
from common import start_up as start_up_on_kafka  # noqa: E402

from trainwire.infra.config import Settings  # noqa: E402
from trainwire.infra.log import ensure_topics  # noqa: E402
from trainwire.producers import init  # noqa: E402
from trainwire.producers.session import close_all  # noqa: E402


class PageReceiver:
    """The on-call end: a webhook that notes when each (run, step) page arrives."""

    def __init__(self):
        self.arrived: dict[tuple[str, int], float] = {}
        self.url = f"{serve_webhook(self._received)}/page"

    def _received(self, _path: str, body) -> None:
        now = time.time()
        if body["state"] == "firing":
            self.arrived.setdefault((body["run_id"], body["step"]), now)


def start_up(home: Path, kafka: str, prefix: str, webhook: str) -> subprocess.Popen:
    config = home / "trainwire.toml"
    # Each NaN's own page: the bench's jobs share an experiment, so grouping would fold them into storm pages
    # (page_storm_bench.py measures those) and the rate limit into summaries.
    config.write_text(f'[alerting]\ngroup_wait_seconds = 0\n\n'
                      f'[[alerting.sinks]]\nkind = "webhook"\nurl = "{webhook}"\nseverities = ["block"]\n'
                      f'states = ["firing"]\nrate_limit_per_minute = 0\n')
    return start_up_on_kafka(home, kafka, prefix, {"TRAINWIRE_CONFIG": str(config)})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kafka", default="127.0.0.1:9092")
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--steps-per-s", type=float, default=2)
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--nans-per-s", type=float, default=4)
    parser.add_argument("--name", default="page_latency")
    args = parser.parse_args()

    receiver = PageReceiver()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        prefix = f"page-{uuid.uuid4().hex[:6]}."
        settings = Settings(home=home / "jobs", kafka=args.kafka, topic_prefix=prefix, heartbeat_seconds=600,
                            queue_size=1_000_000)
        ensure_topics(settings, [settings.topic(t) for t in ("events", "gpu", "alerts", "control", "dead-letters")])
        up = start_up(home, args.kafka, prefix, receiver.url)
        runs = [init("pages", f"job-{i}", settings=settings, sample_gpus=False) for i in range(args.jobs)]
        logged_nan: dict[tuple[str, int], float] = {}
        step, started, nan_due, victim = 0, time.monotonic(), time.monotonic(), 0
        interval = 1.0 / args.steps_per_s
        while time.monotonic() - started < args.seconds:
            step += 1
            tick = time.monotonic()
            for run in runs:
                run.log_step(step, loss=2.0 / step, learning_rate=1e-4, grad_norm=1.0, tokens_per_s=3000.0)
            while time.monotonic() < tick + interval:
                if time.monotonic() >= nan_due:  # between the healthy steps, a job's loss turns NaN
                    run = runs[victim % len(runs)]
                    victim += 1
                    logged_nan[(run.run_id, step)] = time.time()
                    run.log_step(step, loss=float("nan"), learning_rate=1e-4, grad_norm=1.0)
                    nan_due += 1.0 / args.nans_per_s
                time.sleep(max(0.0, min(nan_due, tick + interval) - time.monotonic()))
            if step % max(1, int(args.steps_per_s * 5)) == 0:
                print(f"t={time.monotonic() - started:.0f}s steps {step * args.jobs} NaNs {len(logged_nan)} "
                      f"pages {len(receiver.arrived)}", file=sys.stderr)
        achieved = step * args.jobs / (time.monotonic() - started)
        deadline = time.monotonic() + 60
        while len(receiver.arrived) < len(logged_nan) and time.monotonic() < deadline:
            time.sleep(0.2)
        for run in runs:
            run.finish()
        close_all()
        up.terminate()
        up.wait(timeout=60)
    latencies = [receiver.arrived[key] - at for key, at in logged_nan.items() if key in receiver.arrived]
    result = {"kafka": args.kafka, "jobs": args.jobs, "steps_per_s_per_job": args.steps_per_s,
              "healthy_events_per_s": round(achieved), "nans_logged": len(logged_nan),
              "pages_received": len(latencies), "pages_missing": len(logged_nan) - len(latencies),
              "latency_s": {k: round(v, 3) if isinstance(v, float) else v
                            for k, v in percentiles(latencies).items()} if len(latencies) > 1 else None,
              "path": "log_step → SDK → Kafka → trainwire up (ingest + detectors → chdb insert → alerts topic → "
                      "alert consumer → outbox) → webhook POST"}
    print(json.dumps(result, indent=2))
    write_result(args.name, result)


if __name__ == "__main__":
    main()
