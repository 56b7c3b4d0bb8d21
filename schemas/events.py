"""Pydantic models of every trainwire event: the validated, typed side of the Avro contract.

Field names and optionality mirror `avro/<kind>.v<N>.avsc` exactly (a contract test keeps them in step).
NaN and ±Inf are legal metric values: they are carried, stored and detected, never rejected.
"""

from __future__ import annotations

import math
import os
import random
import time
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# The largest value each integer column holds. Avro's `long` is signed 64-bit, so UInt64 columns hold what an Avro
# long can (2**63 - 1); a value past its column's range would be refused by ClickHouse, so the models refuse it first.
UINT16_MAX = 2**16 - 1
UINT32_MAX = 2**32 - 1
LONG_MAX = 2**63 - 1
LONG_MIN = -(2**63)

RunStatus = Literal["completed", "failed", "stopped"]
Severity = Literal["info", "warning", "critical", "block"]
AlertState = Literal["firing", "resolved"]


# A generator of trainwire's own: training scripts seed the global `random` (random.seed(42)), and two processes
# seeded alike would then make the same ids. Seeded from os.urandom, and again in every forked child.
_ids = random.Random()
os.register_at_fork(after_in_child=_ids.seed)


def new_id() -> str:
    """A random (version 4) UUID string, about 3× faster than str(uuid.uuid4()): ids are made per event.

    Ids need uniqueness, not secrecy, so a Mersenne Twister seeded from os.urandom that no user code seeds.
    """
    h = "%032x" % _ids.getrandbits(128)
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Event(BaseModel):
    """Fields every telemetry event carries."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: ClassVar[str]

    event_id: str = Field(default_factory=new_id)
    run_id: str
    experiment: str
    team: str = ""
    host: str = ""
    seq: int = Field(ge=0, le=LONG_MAX)
    ts_ms: int = Field(default_factory=now_ms, ge=0, le=LONG_MAX)

    @field_validator("run_id", "experiment")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value


class FileDigest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    size: int = Field(ge=0, le=LONG_MAX)
    sha256: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")


class RunStarted(Event):
    kind: ClassVar[str] = "run_started"
    run_name: str = ""
    user: str = ""
    tags: dict[str, str] = Field(default_factory=dict)
    hyperparameters_json: str = "{}"
    config_file: str | None = None
    config_sha256: str | None = None
    git_commit: str | None = None
    git_dirty: bool | None = None
    base_model: str | None = None
    base_model_source: str | None = None
    base_model_revision: str | None = None
    base_model_sha256: str | None = None
    dataset_path: str | None = None
    dataset_version: str | None = None
    dataset_sha256: str | None = None
    dataset_samples: int | None = Field(default=None, ge=0, le=LONG_MAX)
    seed: int | None = Field(default=None, ge=LONG_MIN, le=LONG_MAX)
    data_seed: int | None = Field(default=None, ge=LONG_MIN, le=LONG_MAX)
    environment: dict[str, str] = Field(default_factory=dict)
    gpu_type: str | None = None
    gpu_count: int | None = Field(default=None, ge=0, le=UINT32_MAX)
    total_steps: int | None = Field(default=None, ge=0, le=LONG_MAX)
    total_epochs: float | None = None
    # v2: the rest of the lineage an auditor needs (spec §3, §7)
    dataset_source: str | None = None
    dataset_license: str | None = None
    dataset_format: str | None = None
    dataset_preprocessing: list[str] = Field(default_factory=list)
    numpy_seed: int | None = Field(default=None, ge=LONG_MIN, le=LONG_MAX)
    cudnn_deterministic: bool | None = None
    cudnn_benchmark: bool | None = None
    deterministic_algorithms: bool | None = None
    gpu_driver_version: str | None = None
    cuda_version: str | None = None
    container_image_digest: str | None = None
    packages_sha256: str | None = None
    world_size: int | None = Field(default=None, ge=1, le=UINT32_MAX)
    adapter_json: str | None = None


class Step(Event):
    kind: ClassVar[str] = "step"
    step: int = Field(ge=0, le=LONG_MAX)
    epoch: float | None = None
    loss: float | None = None
    learning_rate: float | None = None
    grad_norm: float | None = None
    tokens_per_s: float | None = None
    samples_per_s: float | None = None
    batch_time_s: float | None = None
    tokens: int | None = Field(default=None, ge=0, le=LONG_MAX)
    extra: dict[str, float] = Field(default_factory=dict)


class Eval(Event):
    kind: ClassVar[str] = "eval"
    step: int = Field(ge=0, le=LONG_MAX)
    epoch: float | None = None
    eval_loss: float | None = None
    eval_accuracy: float | None = None
    perplexity: float | None = None
    runtime_s: float | None = None
    metrics: dict[str, float] = Field(default_factory=dict)

    @classmethod
    def perplexity_of(cls, eval_loss: float | None) -> float | None:
        if eval_loss is None:
            return None
        try:
            return math.exp(eval_loss)
        except OverflowError:
            return math.inf


class GpuSample(Event):
    kind: ClassVar[str] = "gpu_sample"
    rank: int = Field(default=0, ge=0, le=UINT16_MAX)
    gpu_index: int = Field(ge=0, le=UINT16_MAX)
    gpu_uuid: str
    gpu_name: str = ""
    utilization_pct: float | None = None
    memory_used_mb: float | None = None
    memory_total_mb: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    sm_clock_mhz: float | None = None
    mem_clock_mhz: float | None = None


def _count() -> Any:
    """An optional producer counter (v2 of heartbeat and run ended)."""
    return Field(default=None, ge=0, le=LONG_MAX)


class Heartbeat(Event):
    kind: ClassVar[str] = "heartbeat"
    step: int | None = Field(default=None, ge=0, le=LONG_MAX)
    # v2: what the producer lost so far (docs/sdk.md); None in v1 messages
    events_dropped: int | None = _count()
    events_invalid: int | None = _count()
    events_spooled: int | None = _count()
    spool_bytes: int | None = _count()


class Checkpoint(Event):
    kind: ClassVar[str] = "checkpoint"
    step: int = Field(ge=0, le=LONG_MAX)
    path: str
    files: list[FileDigest] = Field(default_factory=list)
    eval_loss: float | None = None
    is_best: bool | None = None
    # v2: True marks the checkpoint recorded at `path` as gone from disk (e.g. rotated by save_total_limit)
    deleted: bool | None = None


class RunEnded(Event):
    kind: ClassVar[str] = "run_ended"
    status: RunStatus
    error: str | None = None
    duration_s: float | None = Field(default=None, ge=0)
    completed_steps: int | None = Field(default=None, ge=0, le=LONG_MAX)
    epochs: float | None = None
    initial_loss: float | None = None
    final_loss: float | None = None
    best_eval_loss: float | None = None
    best_checkpoint: str | None = None
    artifacts: list[FileDigest] = Field(default_factory=list)
    # v2: what the producer lost of this run (docs/sdk.md); None in v1 messages
    events_dropped: int | None = _count()
    events_invalid: int | None = _count()
    events_spooled: int | None = _count()
    spool_bytes: int | None = _count()


class Alert(BaseModel):
    """Raised or resolved by a detector in the consumers; not a telemetry event, so no host or seq."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: ClassVar[str] = "alert"

    event_id: str = Field(default_factory=new_id)
    run_id: str
    experiment: str
    team: str = ""
    ts_ms: int = Field(default_factory=now_ms, ge=0, le=LONG_MAX)
    rule: str
    severity: Severity
    state: AlertState
    step: int | None = Field(default=None, ge=0, le=LONG_MAX)
    value: float | None = None
    threshold: float | None = None
    message: str = ""
    dedup_key: str


# The run started tag by which a run opts in to the stop switch (docs/stop-switch.md).
STOP_ON_BLOCK_TAG = "trainwire.stop_on_block"


class StopCommand(BaseModel):
    """Issued by the stop switch on the control topic: the run it names stops training gracefully."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: ClassVar[str] = "stop_command"

    event_id: str = Field(default_factory=new_id)
    run_id: str
    experiment: str
    team: str = ""
    ts_ms: int = Field(default_factory=now_ms, ge=0, le=LONG_MAX)
    rule: str
    step: int | None = Field(default=None, ge=0, le=LONG_MAX)
    reason: str
    dedup_key: str


# The producer counters a heartbeat and a run ended carry (filled in by the SDK's sender).
PRODUCER_COUNTERS = ("events_dropped", "events_invalid", "events_spooled", "spool_bytes")

EVENT_TYPES: dict[str, type[BaseModel]] = {
    cls.kind: cls for cls in (RunStarted, Step, Eval, GpuSample, Heartbeat, Checkpoint, RunEnded, Alert, StopCommand)
}
