"""A fleet's telemetry as the broker would hold it, for the ingest benchmark: messages made with the real event
models and `encode`, keyed by run id and put on the topic the SDK puts them on, in time order.

Every job is watched from its first step, as the store would hold it (a test runs the detectors over it), and logs
steps at `steps_per_s`, an eval every `eval_every_steps` steps, one GPU sample per GPU every `gpu_sample_every_s`
and a heartbeat every `heartbeat_every_s`, so the kinds' proportions follow from the time simulated, as they would
on a real fleet. Curves are healthy (decaying loss with 1 % noise, a constant learning rate, GPUs busy and cool), so
the detectors stay quiet but for what is injected: `nan_losses` steps of distinct runs with a NaN loss (each pages)
and `corrupt_messages` truncated bodies (each a dead letter).
"""

from __future__ import annotations

import math
import multiprocessing
import random
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from typing import NamedTuple

from trainwire.infra.log.topics import topic_for
from trainwire.schemas import Eval, GpuSample, Heartbeat, Step, encode

CORRUPT = "corrupt"  # the kind noted for a truncated body: no event kind, a dead letter
RUNS_PER_TASK = 25  # runs a generating process makes per task


class Message(NamedTuple):
    ts_ms: int
    topic: str  # before the topic prefix: "events" or "gpu"
    key: bytes  # the run id, as the SDK keys every message
    value: bytes
    kind: str


@dataclass(frozen=True)
class FleetMix:
    runs: int = 1_000
    seconds: float = 60.0
    steps_per_s: float = 1.0
    eval_every_steps: int = 50
    gpus_per_job: int = 8
    gpu_sample_every_s: float = 5.0
    heartbeat_every_s: float = 5.0
    nan_losses: int = 10
    corrupt_messages: int = 10
    seed: int = 0

    def __post_init__(self):
        if not 0 <= self.nan_losses <= self.runs:
            raise ValueError(f"nan_losses must be between 0 and runs ({self.runs}): one NaN per run at most")

    @classmethod
    def for_events(cls, events: int, **fields) -> FleetMix:
        """The mix whose simulated window holds about `events` messages."""
        shape = cls(**fields)
        return cls(**{**fields, "seconds": events / (shape.runs * shape.events_per_job_s())})

    def events_per_job_s(self) -> float:
        return (self.steps_per_s * (1 + 1 / self.eval_every_steps) + self.gpus_per_job / self.gpu_sample_every_s
                + 1 / self.heartbeat_every_s)

    def describe(self) -> dict:
        return {**asdict(self), "events_per_job_s": round(self.events_per_job_s(), 3),
                "fleet_events_per_s": round(self.runs * self.events_per_job_s()),
                "curves": "jobs watched from their first step, loss decaying with 1 % noise, GPUs "
                          "busy and cool: healthy but for the NaN losses (one step each, on distinct runs) and the "
                          "corrupt messages (real bodies cut in half)"}


def generate(mix: FleetMix, end_ms: int, workers: int = 1) -> list[Message]:
    """The fleet's messages in time order (the window ends at `end_ms`), made in `workers` spawned processes
    (encoding costs ~30 µs an event: a million take half a minute on one core)."""
    rng = random.Random(mix.seed)
    nan_at = {run: rng.random() for run in rng.sample(range(mix.runs), mix.nan_losses)}
    tasks = [(mix, range(start, min(start + RUNS_PER_TASK, mix.runs)), end_ms, nan_at)
             for start in range(0, mix.runs, RUNS_PER_TASK)]
    if workers <= 1:
        parts = [_runs_messages(*task) for task in tasks]
    else:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            parts = pool.starmap(_runs_messages, tasks)
    messages = sorted((m for part in parts for m in part), key=lambda m: m.ts_ms)  # stable: each run keeps its order
    for i in sorted(rng.sample(range(len(messages)), min(mix.corrupt_messages, len(messages))), reverse=True):
        intact = messages[i]
        messages.insert(i + 1, intact._replace(value=intact.value[:len(intact.value) // 2], kind=CORRUPT))
    return messages


def kinds_of(messages: list[Message]) -> dict[str, int]:
    return dict(Counter(m.kind for m in messages))


def _runs_messages(mix: FleetMix, runs: range, end_ms: int, nan_at: dict[int, float]) -> list[Message]:
    out: list[Message] = []
    for run in runs:
        out.extend(_run_messages(mix, run, end_ms, nan_at.get(run)))
    return out


def _run_messages(mix: FleetMix, run: int, end_ms: int, nan_fraction: float | None) -> list[Message]:
    """One job's messages in its order, each with the next `seq` of the run (the SDK numbers a run's events, on
    every topic, from one counter)."""
    rng = random.Random(f"{mix.seed}/{run}")
    run_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    envelope = {"run_id": run_id, "experiment": f"fleet-{run % 20}", "host": f"node-{run // 8:04d}"}
    start_ms = end_ms - mix.seconds * 1000
    # Watched from its first step, as the store holds a run: a job that appeared mid-training, its early losses
    # unseen, would look underfitting to the detectors (no progress from what they saw as its start).
    start_loss, floor, tau = rng.uniform(2.2, 3.2), rng.uniform(0.3, 0.7), rng.uniform(150, 600)
    gpu_uuids = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(mix.gpus_per_job)]

    steps = math.floor(mix.seconds * mix.steps_per_s)
    step_phase = rng.uniform(0, 1 / mix.steps_per_s)
    nan_step = None if nan_fraction is None else int(nan_fraction * steps)
    timeline: list[tuple[float, type, dict]] = []
    for i in range(steps):
        t, step = step_phase + i / mix.steps_per_s, i
        loss = (floor + (start_loss - floor) * math.exp(-step / tau)) * (1 + rng.gauss(0, 0.01))
        timeline.append((t, Step, {"step": step, "loss": math.nan if step == nan_step else loss,
                                   "learning_rate": 2e-4, "grad_norm": max(0.1, 0.8 + rng.gauss(0, 0.1)),
                                   "tokens_per_s": rng.gauss(3200, 80), "epoch": step / 2_000}))
        if step % mix.eval_every_steps == 0:
            timeline.append((t, Eval, {"step": step, "eval_loss": loss * 1.05, "perplexity": math.exp(loss * 1.05),
                                       "runtime_s": 12.0}))
    gpu_phase = rng.uniform(0, mix.gpu_sample_every_s)
    for j in range(math.floor(mix.seconds / mix.gpu_sample_every_s)):
        for index, gpu_uuid in enumerate(gpu_uuids):
            timeline.append((gpu_phase + j * mix.gpu_sample_every_s, GpuSample, {
                "gpu_index": index, "gpu_uuid": gpu_uuid, "gpu_name": "NVIDIA H100 80GB HBM3",
                "utilization_pct": rng.uniform(90, 99), "memory_used_mb": rng.uniform(60_000, 72_000),
                "memory_total_mb": 81_559.0, "temperature_c": rng.uniform(55, 72), "power_w": rng.uniform(550, 680),
                "sm_clock_mhz": 1_980.0, "mem_clock_mhz": 2_619.0}))
    beat_phase = rng.uniform(0, mix.heartbeat_every_s)
    for j in range(math.floor(mix.seconds / mix.heartbeat_every_s)):
        t = beat_phase + j * mix.heartbeat_every_s
        timeline.append((t, Heartbeat, {"step": int(t * mix.steps_per_s), "events_dropped": 0,
                                        "events_invalid": 0, "events_spooled": 0, "spool_bytes": 0}))
    timeline.sort(key=lambda entry: entry[0])

    key = run_id.encode()
    seq = int(start_ms * 1000)  # as the SDK: from the process's start in µs
    out = []
    for n, (t, model, fields) in enumerate(timeline):
        ts_ms = int(start_ms + t * 1000)
        event = model(**envelope, **fields, seq=seq + n, ts_ms=ts_ms)
        out.append(Message(ts_ms, topic_for(model.kind), key, encode(event), model.kind))
    return out
