"""Simulated training jobs for the demo and benchmarks: realistic curves, optional injected faults."""

from __future__ import annotations

import math
import random
import threading
import time
from dataclasses import dataclass

from .run import Run

FAULTS = ("nan", "spike", "gradnorm")


@dataclass(frozen=True)
class JobPlan:
    steps: int
    step_seconds: float = 0.0
    eval_every: int = 50
    checkpoint_every: int = 100
    fault: str | None = None
    seed: int = 0


def lr_at(step: int, steps: int, peak: float = 2e-4, warmup: int = 20) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * peak * (1 + math.cos(math.pi * min(1.0, progress)))


def run_job(run: Run, plan: JobPlan, stop: threading.Event | None = None) -> None:
    """Drive `run` through a fine-tune-shaped curve: exponential loss decay with noise, cosine LR."""
    rng = random.Random(plan.seed)
    start_loss, floor, tau = rng.uniform(2.2, 3.2), rng.uniform(0.3, 0.7), plan.steps / rng.uniform(3, 5)
    tokens = 0
    for step in range(1, plan.steps + 1):
        if stop is not None and stop.is_set():
            break
        progress = step / plan.steps
        loss = floor + (start_loss - floor) * math.exp(-step / tau)
        loss *= 1 + rng.gauss(0, 0.01)
        grad_norm = max(0.1, 0.8 + 1.5 * math.exp(-step / tau) + rng.gauss(0, 0.1))
        if plan.fault == "nan" and progress >= 0.6:
            loss, grad_norm = math.nan, math.nan
        elif plan.fault == "spike" and 0.5 <= progress < 0.5 + 3 / plan.steps:
            loss *= 3.0
        elif plan.fault == "gradnorm" and 0.4 <= progress < 0.45:
            grad_norm = rng.uniform(20, 40)
        tokens_per_s = rng.gauss(3200, 80)
        tokens += int(tokens_per_s * 0.25)
        run.log_step(step, loss=loss, learning_rate=lr_at(step, plan.steps), grad_norm=grad_norm,
                     tokens_per_s=tokens_per_s, epoch=3.0 * progress, tokens=tokens)
        if step % plan.eval_every == 0:
            eval_loss = loss * 1.08 if math.isfinite(loss) else loss
            run.log_eval(step, eval_loss=eval_loss, eval_accuracy=max(0.0, 1 - eval_loss / 4) if math.isfinite(eval_loss) else None)
        if step % plan.checkpoint_every == 0:
            run.log_checkpoint(step, f"/tmp/trainwire-demo/{run.run_id}/checkpoint-{step}")
        if plan.step_seconds:
            time.sleep(plan.step_seconds)


class SimulatedGpus:
    """A `GpuSource` for nodes without GPUs: busy, warm A100-like readings."""

    def __init__(self, count: int = 2, seed: int = 0, name: str = "NVIDIA A100-SXM4-80GB"):
        self._rng = random.Random(seed)
        self._gpus = [(i, f"GPU-sim-{seed:04d}-{i}") for i in range(count)]
        self._name = name

    def read(self) -> list[dict]:
        rng = self._rng
        return [{
            "gpu_index": index, "gpu_uuid": uuid, "gpu_name": self._name,
            "utilization_pct": min(100.0, rng.gauss(92, 4)), "memory_used_mb": rng.gauss(61_000, 800),
            "memory_total_mb": 81_920.0, "temperature_c": rng.gauss(66, 2), "power_w": rng.gauss(330, 20),
            "sm_clock_mhz": 1410.0, "mem_clock_mhz": 1593.0,
        } for index, uuid in self._gpus]
