"""Page latency: from `log_step` of a NaN loss to the webhook receiving the page, through the real broker.

    .venv/bin/python benchmarks/page_latency_bench.py [--jobs 1000] [--steps-per-s 2] [--seconds 60] [--nans-per-s 4]
        [--ingest-path columnar|records] [--drivers N]

`--jobs` simulated jobs log `--steps-per-s` healthy steps a second each; `--nans-per-s` times a second one of them,
in turn, logs a NaN loss instead. The jobs are driven by `--drivers` processes (default: one per 10,000 steps/s
offered; one SDK process sends ~20,000 events/s at best, so 1,000 jobs × 50 steps/s needs several), each pacing
its share of the jobs from one thread, as the SDK of that many trainers would send them; the result says how many
steps were offered and how many the drivers achieved, and how many of their ticks ran late. `trainwire up` runs as
its own process on Kafka and chdb (ingest on `--ingest-path`, detectors, alert consumer) and pages a webhook served
here, which notes when each page arrives. Writes benchmarks/results/page_latency.json (or --name).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
import uuid
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import percentiles, serve_webhook, source, write_result  # noqa: E402
from common import start_up as start_up_on_kafka  # noqa: E402

from trainwire.infra.config import Settings  # noqa: E402
from trainwire.infra.log import ensure_topics  # noqa: E402
from trainwire.producers import init  # noqa: E402
from trainwire.producers.session import close_all  # noqa: E402

STEPS_PER_DRIVER = 10_000  # steps/s one driver process is given by default: half what one SDK process can send


class PageReceiver:
    """The on-call end: a webhook that notes when each (run, step) page arrives."""

    def __init__(self):
        self.arrived: dict[tuple[str, int], float] = {}
        self.url = f"{serve_webhook(self._received)}/page"

    def _received(self, _path: str, body) -> None:
        now = time.time()
        if body["state"] == "firing":
            self.arrived.setdefault((body["run_id"], body["step"]), now)


def start_up(home: Path, kafka: str, prefix: str, webhook: str, ingest_path: str) -> subprocess.Popen:
    config = home / "trainwire.toml"
    # Each NaN's own page: the bench's jobs share an experiment, so grouping would fold them into storm pages
    # (page_storm_bench.py measures those) and the rate limit into summaries.
    config.write_text(f'[alerting]\ngroup_wait_seconds = 0\n\n'
                      f'[[alerting.sinks]]\nkind = "webhook"\nurl = "{webhook}"\nseverities = ["block"]\n'
                      f'states = ["firing"]\nrate_limit_per_minute = 0\n')
    return start_up_on_kafka(home, kafka, prefix, {"TRAINWIRE_CONFIG": str(config),
                                                   "TRAINWIRE_INGEST_PATH": ingest_path})


def drive(settings: Settings, jobs: range, steps_per_s: float, seconds: float, nans_per_s: float,
          nan_offset_s: float, ready, go, finish, results) -> None:
    """A driver process: starts `jobs`, says it is ready, and on `go` logs a healthy step for each of them every
    1/`steps_per_s` s for `seconds`, a NaN loss of one of them (in turn) `nans_per_s` times a second between the
    ticks, from `nan_offset_s` on. Puts when each NaN was logged and how the pacing went on `results`; finishes
    its runs on `finish` (their run-ended events would load `trainwire up` while the last pages are due)."""
    runs = [init("pages", f"job-{i}", settings=settings, sample_gpus=False) for i in jobs]
    ready.put(len(runs))
    go.wait()
    logged_nan: list[tuple[str, int, float]] = []
    interval = 1.0 / steps_per_s
    step, late, started = 0, 0, time.monotonic()
    nan_due, victim = started + nan_offset_s, 0
    while time.monotonic() - started < seconds:
        step += 1
        tick = time.monotonic()
        for run in runs:
            run.log_step(step, loss=2.0 / step, learning_rate=1e-4, grad_norm=1.0, tokens_per_s=3000.0)
        late += time.monotonic() > tick + interval
        while time.monotonic() < tick + interval:
            if nans_per_s and time.monotonic() >= nan_due:  # between the healthy steps, a job's loss turns NaN
                run = runs[victim % len(runs)]
                victim += 1
                logged_nan.append((run.run_id, step, time.time()))
                run.log_step(step, loss=float("nan"), learning_rate=1e-4, grad_norm=1.0)
                nan_due += 1.0 / nans_per_s
            time.sleep(max(0.0, min(nan_due if nans_per_s else math.inf, tick + interval) - time.monotonic()))
    elapsed = time.monotonic() - started
    results.put({"steps": step * len(runs), "seconds": elapsed, "ticks": step, "late_ticks": late,
                 "logged_nan": logged_nan})
    finish.wait()
    for run in runs:
        run.finish()
    close_all()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kafka", default="127.0.0.1:9092")
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--steps-per-s", type=float, default=2)
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--nans-per-s", type=float, default=4)
    parser.add_argument("--ingest-path", choices=["columnar", "records"], default="columnar")
    parser.add_argument("--drivers", type=int, help=f"driver processes (default: one per {STEPS_PER_DRIVER:,} "
                        "steps/s offered)")
    parser.add_argument("--name", default="page_latency")
    args = parser.parse_args()
    offered = args.jobs * args.steps_per_s
    drivers = args.drivers or max(1, math.ceil(offered / STEPS_PER_DRIVER))
    drivers = min(drivers, args.jobs)

    receiver = PageReceiver()
    context = get_context("spawn")
    ready, results, go, finish = context.Queue(), context.Queue(), context.Event(), context.Event()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        prefix = f"page-{uuid.uuid4().hex[:6]}."
        settings = Settings(home=home / "jobs", kafka=args.kafka, topic_prefix=prefix, heartbeat_seconds=600,
                            queue_size=1_000_000)
        ensure_topics(settings, [settings.topic(t) for t in ("events", "gpu", "alerts", "control", "dead-letters")])
        up = start_up(home, args.kafka, prefix, receiver.url, args.ingest_path)
        processes = []
        for n in range(drivers):
            # each its own home: the SDK's spool is one per process
            own = settings.model_copy(update={"home": home / f"jobs-{n}"})
            share = range(n, args.jobs, drivers)
            processes.append(context.Process(target=drive, daemon=True, args=(
                own, share, args.steps_per_s, args.seconds, args.nans_per_s / drivers, n / args.nans_per_s
                if args.nans_per_s else 0.0, ready, go, finish, results)))
            processes[-1].start()
        for _ in processes:
            ready.get(timeout=300)
        print(f"{drivers} driver process(es) ready; logging {offered:,.0f} steps/s for {args.seconds} s",
              file=sys.stderr)
        go.set()
        started = time.monotonic()
        while time.monotonic() - started < args.seconds:
            time.sleep(5)
            print(f"t={time.monotonic() - started:.0f}s pages {len(receiver.arrived)}", file=sys.stderr)
        driven = [results.get(timeout=600) for _ in processes]
        logged_nan = {(run_id, step): at for d in driven for run_id, step, at in d["logged_nan"]}
        deadline = time.monotonic() + 60
        while len(receiver.arrived) < len(logged_nan) and time.monotonic() < deadline:
            time.sleep(0.2)
        finish.set()
        for process in processes:
            process.join(timeout=120)
        up.terminate()
        up.wait(timeout=60)
    achieved = sum(d["steps"] for d in driven) / max(d["seconds"] for d in driven)
    latencies = [receiver.arrived[key] - at for key, at in logged_nan.items() if key in receiver.arrived]
    result = {"kafka": args.kafka, "source": source(), "ingest_path": args.ingest_path, "jobs": args.jobs,
              "steps_per_s_per_job": args.steps_per_s, "offered_events_per_s": round(offered),
              "healthy_events_per_s": round(achieved),
              "drivers": {"processes": drivers, "late_ticks": sum(d["late_ticks"] for d in driven),
                          "ticks": sum(d["ticks"] for d in driven),
                          "kept_up": achieved >= 0.95 * offered},
              "nans_logged": len(logged_nan),
              "pages_received": len(latencies), "pages_missing": len(logged_nan) - len(latencies),
              "latency_s": {k: round(v, 3) if isinstance(v, float) else v
                            for k, v in percentiles(latencies).items()} if len(latencies) > 1 else None,
              "path": "log_step → SDK → Kafka → trainwire up (ingest + detectors → chdb insert → alerts topic → "
                      "alert consumer → outbox) → webhook POST"}
    print(json.dumps(result, indent=2))
    write_result(args.name, result)
    if not result["drivers"]["kept_up"]:
        print(f"the drivers achieved {achieved:,.0f} of {offered:,.0f} steps/s offered: more --drivers, or a "
              "machine with more cores", file=sys.stderr)


if __name__ == "__main__":
    main()
