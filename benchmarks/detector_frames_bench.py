"""Detectors benchmark: µs per event of the columnar entry (`DetectorEngine.observe_frames`) against `observe` per
event, on the same batches of a healthy fleet in steady state.

    .venv/bin/python benchmarks/detector_frames_bench.py [--runs 1000] [--batch 20000] [--batches 10]

The fleet: `--runs` runs under way, each logging a step a second (a noisy decaying loss, grad norm,
throughput), an eval every 50 steps, a heartbeat every 5 s and its 8 GPUs sampled every 5 s: ~2.8 events per
run-second, so a batch of 20,000 holds ~7 s of it. Each poll holds each partition's records together (32
partitions for the runs' events, GPU samples on a topic of their own). Both engines are warmed on the same
events (80 s of the fleet: every window full) through their own entry, then judge the measured batches,
alternately, with the GC tuned as `consume` tunes it; the times are CPU times of the process (this machine is
shared). Frames are built straight from the rows (Arrow), outside the timing; the per-event side gets the same
rows as dicts (what fastavro hands it) and `prefetch`, as the per-record path calls it. Writes
results/detector_frames.json.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import source, write_result  # noqa: E402

from trainwire.consumers.detectors import DetectorEngine  # noqa: E402
from trainwire.consumers.frames import Frame, reader_schema  # noqa: E402
from trainwire.consumers.service import tune_gc_for_ingest  # noqa: E402

GPUS = 8
PARTITIONS = 32


def fleet_seconds(runs: int, first: int, last: int, seed: int = 0) -> list[tuple[str, dict]]:
    """(kind, record) of every event the fleet sends in seconds [first, last), in arrival order."""
    events = []
    for second in range(first, last):
        for run in range(runs):
            rng = random.Random(seed * 1_000_003 + second * 10_007 + run)
            envelope = {"event_id": f"{run}-{second}", "run_id": f"run-{run:05d}", "experiment": "fleet",
                        "team": "ml", "host": f"node-{run}"}
            ts = second * 1000 + run % 1000
            seq = second * 20
            step = second + 1
            loss = (0.3 + 2.0 * math.exp(-step / 400)) * (1 + rng.uniform(-0.05, 0.05))
            events.append(("step", {**envelope, "seq": seq, "ts_ms": ts, "step": step, "epoch": step / 1000,
                                    "loss": loss, "learning_rate": 2e-4, "grad_norm": rng.uniform(0.5, 2.0),
                                    "tokens_per_s": rng.gauss(3000, 100), "samples_per_s": 12.0,
                                    "batch_time_s": 1.0, "tokens": 4096 * step, "extra": {}}))
            if (step + run) % 50 == 0:  # runs started at different times
                events.append(("eval", {**envelope, "seq": seq + 1, "ts_ms": ts + 1, "step": step, "epoch": None,
                                        "eval_loss": loss * 1.05, "eval_accuracy": 0.7, "perplexity": None,
                                        "runtime_s": 3.0, "metrics": {}}))
            if (second + run) % 5 == 0:
                events.append(("heartbeat", {**envelope, "seq": seq + 2, "ts_ms": ts + 2, "step": step,
                                             "events_dropped": 0, "events_invalid": 0, "events_spooled": 0,
                                             "spool_bytes": 0}))
                for gpu in range(GPUS):
                    events.append(("gpu_sample", {**envelope, "seq": seq + 3 + gpu, "ts_ms": ts + 3, "rank": gpu,
                                                  "gpu_index": gpu, "gpu_uuid": f"GPU-{run}-{gpu}",
                                                  "gpu_name": "H100", "utilization_pct": rng.uniform(85, 100),
                                                  "memory_used_mb": 60_000.0, "memory_total_mb": 81_920.0,
                                                  "temperature_c": rng.uniform(55, 75), "power_w": 500.0,
                                                  "sm_clock_mhz": 1980.0, "mem_clock_mhz": 2619.0}))
    return events


def frames_of(events: list[tuple[str, dict]]) -> dict[str, Frame]:
    by_kind: dict[str, list[int]] = {}
    for position, (kind, _) in enumerate(events):
        by_kind.setdefault(kind, []).append(position)
    frames = {}
    for kind, positions in by_kind.items():
        rows = [{k: (list(v.items()) if isinstance(v, dict) else v) for k, v in events[p][1].items()}
                for p in positions]
        frames[kind] = Frame(kind, pa.Table.from_pylist(rows, schema=reader_schema(kind)),
                             np.array(positions, dtype=np.int64), [b""] * len(positions),
                             np.zeros(len(positions), dtype=np.int32), [""])
    return frames


def source_of(kind: str, record: dict) -> tuple[str, int]:
    """(topic, partition): runs keyed to one of 32 partitions; GPU samples travel on their own topic."""
    return "gpu" if kind == "gpu_sample" else "events", int(record["run_id"][4:]) % PARTITIONS


def batches_of(events: list, size: int) -> list[list]:
    """Polls of `size` events, each partition's records together, as a consumer receives them."""
    return [sorted(events[start:start + size], key=lambda event: source_of(*event))
            for start in range(0, len(events), size)]


def per_event(engine: DetectorEngine, batch: list[tuple[str, dict]], sources: list) -> int:
    engine.prefetch(batch)
    alerts = 0
    for (kind, record), where in zip(batch, sources):
        alerts += len(engine.observe(kind, record, where))
    return alerts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=20_000)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--warm-seconds", type=int, default=80)
    args = parser.parse_args()

    per_second = len(fleet_seconds(args.runs, 0, 5)) / 5
    seconds = math.ceil(args.batch * args.batches / per_second) + 1
    warm = batches_of(fleet_seconds(args.runs, 0, args.warm_seconds), args.batch)
    measured = batches_of(fleet_seconds(args.runs, args.warm_seconds, args.warm_seconds + seconds),
                          args.batch)[:args.batches]
    sources = [[source_of(kind, record) for kind, record in batch] for batch in warm + measured]
    framed, each = DetectorEngine(), DetectorEngine()
    for batch, where in zip(warm, sources):
        framed.observe_frames(frames_of(batch), where)
        per_event(each, batch, where)
    measured_frames = [frames_of(batch) for batch in measured]
    tune_gc_for_ingest()

    load_before = os.getloadavg()
    columnar_us, event_us, mix = [], [], {}
    for batch, frames, where in zip(measured, measured_frames, sources[len(warm):]):
        for kind, _ in batch:
            mix[kind] = mix.get(kind, 0) + 1
        started = time.process_time()
        framed_alerts = framed.observe_frames(frames, where)
        columnar_us.append((time.process_time() - started) / len(batch) * 1e6)
        started = time.process_time()
        each_alerts = per_event(each, batch, where)
        event_us.append((time.process_time() - started) / len(batch) * 1e6)
        assert len(framed_alerts) == each_alerts, "the entries disagree"
    gc.collect()
    result = {
        "source": source(), "runs": args.runs, "batch": args.batch, "batches": len(measured),
        "mix": {kind: round(count / sum(mix.values()), 4) for kind, count in sorted(mix.items())},
        "observe_frames_us_per_event": {"median": round(statistics.median(columnar_us), 3),
                                        "min": round(min(columnar_us), 3), "max": round(max(columnar_us), 3)},
        "observe_us_per_event": {"median": round(statistics.median(event_us), 3),
                                 "min": round(min(event_us), 3), "max": round(max(event_us), 3)},
        "failures": framed.failures,
        "load_average_1min": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
    }
    print(result)
    write_result("detector_frames", result)


if __name__ == "__main__":
    main()
