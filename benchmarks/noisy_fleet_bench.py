"""Noisy fleet benchmark: how often the detectors page for healthy-but-noisy runs, and whether faults still page.

    .venv/bin/python benchmarks/noisy_fleet_bench.py [--runs 1000] [--steps 1200] [--step-seconds 3]

Drives the detector engine (the rules, their hysteresis and floors, with the deployment defaults) with 1,000
simulated fine-tunes of varied, realistic noise: losses decaying to floors between 0.005 and 0.8 (many near zero at
the end), relative noise 1–10 %, absolute jitter up to 0.01, some with a small saw-tooth (+0.012 every
4th step, as gradient accumulation or data order make), grad norms, throughput and evals with their own noise. Then the same fleet with a tenth of the runs given an
injected fault (NaN loss, a 3-step spike, a grad-norm burst): every fault must fire, at the step it appears.

Reports firing alerts (pages) per run-hour for the healthy fleet (target 0) by rule, and for the faulty fleet the
share of faults that paged and their latency in steps. Transport and paging latency are page_latency_bench.py's.
Writes results/noisy_fleet.json.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result  # noqa: E402

from trainwire.consumers.detectors import DetectorEngine  # noqa: E402

FAULTS = ("nan", "spike", "gradnorm")
FAULT_RULE = {"nan": "loss_not_finite", "spike": "loss_spike", "gradnorm": "grad_norm_high"}


def run_events(seed: int, steps: int, step_ms: int, fault: str | None):
    """(kind, record, is_fault_step) of one run, in order."""
    rng = random.Random(seed)
    start = rng.uniform(1.5, 3.5)
    floor = rng.choice([rng.uniform(0.005, 0.05), rng.uniform(0.05, 0.3), rng.uniform(0.3, 0.8)])
    tau = steps / rng.uniform(2, 40)
    relative, jitter = rng.uniform(0.01, 0.10), rng.uniform(0, 0.01)
    saw = rng.random() < 0.3
    eval_gap = rng.uniform(1.0, 1.15)  # how far above the train loss this run's evals sit
    fault_at = int(steps * rng.uniform(0.3, 0.8)) if fault else None
    envelope = {"run_id": f"run-{seed}", "experiment": "fleet", "team": "", "host": f"node-{seed % 50}"}
    for step in range(1, steps + 1):
        smooth = floor + (start - floor) * math.exp(-step / tau)
        loss = smooth * (1 + rng.uniform(-relative, relative))
        loss = max(1e-4, loss + rng.uniform(-jitter, jitter) + (0.012 if saw and step % 4 == 0 else 0.0))
        grad_norm = max(0.05, 0.6 + 2.0 * math.exp(-step / tau) + rng.gauss(0, 0.15))
        faulty = False
        if fault == "nan" and step >= fault_at:
            loss, grad_norm, faulty = math.nan, math.nan, True
        elif fault == "spike" and fault_at <= step < fault_at + 3:
            loss, faulty = loss * 3 + 0.3, True
        elif fault == "gradnorm" and fault_at <= step < fault_at + steps // 20:
            grad_norm, faulty = rng.uniform(20, 40), True
        record = {**envelope, "seq": step, "ts_ms": step * step_ms, "step": step, "loss": loss,
                  "grad_norm": grad_norm, "tokens_per_s": rng.gauss(3200, 160)}
        yield "step", record, faulty
        if step % 50 == 0 and math.isfinite(loss):
            # a fixed held-out set: none of a batch's noise, a little of the model's drift
            eval_loss = smooth * eval_gap * (1 + rng.uniform(-0.01, 0.01)) + rng.uniform(0, 0.002)
            yield "eval", {**envelope, "seq": step, "ts_ms": step * step_ms, "step": step, "eval_loss": eval_loss,
                           "eval_accuracy": None, "perplexity": None}, False


def simulate(runs: int, steps: int, step_ms: int, faulty: bool) -> dict:
    engine = DetectorEngine()
    pages: Counter[str] = Counter()
    fault_pages: Counter[str] = Counter()
    detected, latencies = Counter(), []
    started = time.perf_counter()
    events = 0
    for seed in range(runs):
        fault = FAULTS[seed % 3] if faulty and seed % 10 == 0 else None
        first_fault_step = None
        paged = False
        for kind, record, is_fault in run_events(seed, steps, step_ms, fault):
            events += 1
            if is_fault and first_fault_step is None:
                first_fault_step = record["step"]
            for alert in engine.observe(kind, record):
                if alert.state != "firing":
                    continue
                if fault and alert.rule == FAULT_RULE[fault] and first_fault_step is not None and not paged:
                    paged = True
                    detected[fault] += 1
                    latencies.append(record["step"] - first_fault_step)
                elif first_fault_step is not None:  # a consequence of the fault (a NaN grad norm with a NaN loss)
                    fault_pages[alert.rule] += 1
                else:
                    pages[alert.rule] += 1
    run_hours = runs * steps * step_ms / 3_600_000
    return {"runs": runs, "steps_per_run": steps, "run_hours": round(run_hours, 1), "events": events,
            "seconds": round(time.perf_counter() - started, 1),
            "other_pages": dict(pages), "other_pages_per_run_hour": round(sum(pages.values()) / run_hours, 4),
            "faults_injected": {f: runs // 10 // 3 + (1 if (runs // 10) % 3 > i else 0) for i, f in enumerate(FAULTS)}
            if faulty else {}, "faults_paged": dict(detected),
            "fault_latency_steps_max": max(latencies, default=None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--step-seconds", type=float, default=3.0, help="simulated time per logged step")
    args = parser.parse_args()
    step_ms = int(args.step_seconds * 1000)
    healthy = simulate(args.runs, args.steps, step_ms, faulty=False)
    print(f"healthy fleet: {healthy['other_pages_per_run_hour']} pages per run-hour {healthy['other_pages']}")
    with_faults = simulate(args.runs, args.steps, step_ms, faulty=True)
    print(f"with faults: paged {with_faults['faults_paged']} of {with_faults['faults_injected']}, "
          f"latency ≤ {with_faults['fault_latency_steps_max']} steps; other pages {with_faults['other_pages']}")
    path = write_result("noisy_fleet", {"healthy": healthy, "with_faults": with_faults})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
