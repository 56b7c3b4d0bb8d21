"""Simulated training jobs for the demo and benchmarks: realistic curves, optional injected faults."""

from __future__ import annotations

import math
import random
import threading
import time
from dataclasses import dataclass

from .environment import sha256_bytes
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
    # A job that diverged to NaN goes on spending GPU time until something stops it; steps of a few ms would end it
    # before a stop switch could act, so its steps after the NaN are spread over at least this many seconds.
    diverged_seconds: float = 0.0


def lr_at(step: int, steps: int, peak: float = 2e-4, warmup: int = 20) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * peak * (1 + math.cos(math.pi * min(1.0, progress)))


def _digest(*parts: object) -> str:
    return sha256_bytes("/".join(map(str, parts)).encode())


def simulated_lineage(job: int) -> dict:
    """What a real trainer records about its inputs (see TrainwireCallback), for a simulated job: pinned base
    model, hashed dataset, versioned config, seeds, environment. Enough for the audit record and gate G6."""
    return {
        "base_model": "meta-llama/Meta-Llama-3-8B (simulated)", "base_model_source": "huggingface",
        "base_model_revision": "62bd457b6fe961a42a631306577e622c83876cb6",
        "base_model_sha256": _digest("base-model", "llama-3-8b"),
        "dataset_path": "s3://trainwire-demo/datasets/alpaca-cleaned.jsonl", "dataset_version": "2024-03",
        "dataset_sha256": _digest("dataset", "alpaca-cleaned"), "dataset_samples": 51_760,
        "dataset_source": "yahma/alpaca-cleaned", "dataset_license": "cc-by-4.0", "dataset_format": "alpaca",
        "git_commit": "4f2c1e9a7b3d5f60812e4c9d0a1b2c3d4e5f6a7b", "git_dirty": False,
        "seed": 42 + job, "data_seed": 42 + job, "numpy_seed": 42 + job,
        "environment": {"python": "3.11.7", "torch": "2.5.1", "transformers": "4.46.3", "peft": "0.13.2",
                        "cuda": "12.4", "simulated": "true"},
    }


def simulated_artifacts(run_id: str, step: int) -> list[dict]:
    """Adapter files with sizes and hashes, as the callback reports them for a saved checkpoint or final model."""
    return [{"name": name, "size": size, "sha256": _digest(run_id, step, name)}
            for name, size in (("adapter_model.safetensors", 33_571_624), ("adapter_config.json", 712),
                               ("training_args.bin", 5_240))]


def checkpoint_path(run: Run, step: int) -> str:
    return f"/tmp/trainwire-demo/{run.run_id}/checkpoint-{step}"


def run_job(run: Run, plan: JobPlan, stop: threading.Event | None = None) -> int:
    """Drive `run` through a fine-tune-shaped curve: exponential loss decay with noise, cosine LR. Returns the last
    step trained. A run told to stop (`run.should_stop`, the stop switch) saves a final checkpoint at the step it got
    to and leaves the loop, as the Hugging Face Trainer does under TrainwireCallback; `stop` ends it without one."""
    rng = random.Random(plan.seed)
    start_loss, floor, tau = rng.uniform(2.2, 3.2), rng.uniform(0.3, 0.7), plan.steps / rng.uniform(3, 5)
    tokens, pause, last, diverged = 0, plan.step_seconds, 0, False
    for step in range(1, plan.steps + 1):
        if stop is not None and stop.is_set():
            break
        progress = step / plan.steps
        loss = floor + (start_loss - floor) * math.exp(-step / tau)
        loss *= 1 + rng.gauss(0, 0.01)
        grad_norm = max(0.1, 0.8 + 1.5 * math.exp(-step / tau) + rng.gauss(0, 0.1))
        if plan.fault == "nan" and progress >= 0.6:
            if not diverged:  # the first NaN step: the rest of the run is spent diverged
                diverged, pause = True, max(pause, plan.diverged_seconds / (plan.steps - step + 1))
            loss, grad_norm = math.nan, math.nan
        elif plan.fault == "spike" and 0.5 <= progress < 0.5 + 3 / plan.steps:
            loss *= 3.0
        elif plan.fault == "gradnorm" and 0.4 <= progress < 0.45:
            grad_norm = rng.uniform(20, 40)
        tokens_per_s = rng.gauss(3200, 80)
        tokens += int(tokens_per_s * 0.25)
        run.log_step(step, loss=loss, learning_rate=lr_at(step, plan.steps), grad_norm=grad_norm,
                     tokens_per_s=tokens_per_s, epoch=3.0 * progress, tokens=tokens)
        last = step
        if step % plan.eval_every == 0:
            eval_loss = loss * 1.08 if math.isfinite(loss) else loss
            run.log_eval(step, eval_loss=eval_loss, eval_accuracy=max(0.0, 1 - eval_loss / 4) if math.isfinite(eval_loss) else None)
        stopping = run.should_stop
        if step % plan.checkpoint_every == 0 or stopping:
            run.log_checkpoint(step, checkpoint_path(run, step), files=simulated_artifacts(run.run_id, step))
        if stopping:
            break
        if pause:
            time.sleep(pause)
    return last


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
