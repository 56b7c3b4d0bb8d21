"""Rules over GPU samples. State is kept per GPU (host, GPU); the alert is per (run, rule) as everywhere else.

One incident per run and rule, not per GPU: a run that overheats pages once, however many of its GPUs are hot,
and resolves when none is. The message names the GPU that raised it and how many are affected; the per-GPU
readings are in the Resources view.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .base import QUIET, Finding, Rolling, Rule, RunFacts

GPU_SAMPLE = frozenset({"gpu_sample"})
GpuKey = tuple[str, str]


def gpu_key(record: dict) -> GpuKey:
    return record["host"], record["gpu_uuid"] or str(record["gpu_index"])


def gpu_name(record: dict) -> str:
    return f"GPU {record['gpu_index']} on {record['host'] or 'its host'}"


@dataclass
class _Gpus:
    affected: set[GpuKey] = field(default_factory=set)
    windows: dict[GpuKey, Rolling] = field(default_factory=dict)  # for rules over a window of samples


class _PerGpuRule(Rule):
    kinds: ClassVar[frozenset[str]] = GPU_SAMPLE

    def new_state(self) -> _Gpus:
        return _Gpus()

    def reading(self, record: dict, gpus: _Gpus, run: RunFacts) -> tuple[float, bool] | None:
        """(the reading, whether this GPU is affected now); None when the sample does not say."""
        raise NotImplementedError

    def describe(self, record: dict, value: float) -> str:
        raise NotImplementedError

    def check(self, record: dict, gpus: _Gpus, run: RunFacts) -> Finding | None:
        judged = self.reading(record, gpus, run)
        if judged is None:
            return None
        value, affected = judged
        if not affected and not gpus.affected:
            return QUIET  # the common case, without building the GPU's key
        key = gpu_key(record)
        if affected:
            gpus.affected.add(key)
            others = len(gpus.affected) - 1
            more = f" (and {others} more GPU{'s' if others > 1 else ''})" if others else ""
            return Finding(True, value, self.limit, f"{gpu_name(record)}: {self.describe(record, value)}{more}")
        if key in gpus.affected:
            gpus.affected.discard(key)
            if not gpus.affected:
                return Finding(False, value)
        return QUIET if not gpus.affected else None  # other GPUs keep the incident open

    @property
    def limit(self) -> float:
        raise NotImplementedError


@dataclass
class GpuMemoryHigh(_PerGpuRule):
    used_fraction: float
    rule_id: ClassVar[str] = "gpu_memory_high"
    severity: ClassVar[str] = "warning"

    @property
    def limit(self) -> float:
        return self.used_fraction

    def reading(self, record: dict, gpus: _Gpus, run: RunFacts) -> tuple[float, bool] | None:
        used, total = record.get("memory_used_mb"), record.get("memory_total_mb")
        if used is None or not total or total <= 0:
            return None
        fraction = used / total
        return fraction, fraction >= self.used_fraction

    def describe(self, record: dict, value: float) -> str:
        return (f"memory {record['memory_used_mb']:.0f} of {record['memory_total_mb']:.0f} MB used "
                f"({value:.1%} ≥ {self.used_fraction:.0%})")


@dataclass
class GpuTemperatureHigh(_PerGpuRule):
    celsius: float
    rule_id: ClassVar[str] = "gpu_temperature_high"
    severity: ClassVar[str] = "critical"

    @property
    def limit(self) -> float:
        return self.celsius

    def reading(self, record: dict, gpus: _Gpus, run: RunFacts) -> tuple[float, bool] | None:
        temperature = record.get("temperature_c")
        if temperature is None:
            return None
        return temperature, temperature >= self.celsius

    def describe(self, record: dict, value: float) -> str:
        return f"temperature {value:.0f} °C ≥ {self.celsius:g} °C"


@dataclass
class GpuUtilizationLow(_PerGpuRule):
    """Most (more than half) of a GPU's last `window` samples below `min_utilization_pct`, counting only samples
    taken once the run has logged a step: loading the model and data before training is not idling."""

    min_utilization_pct: float
    window: int
    rule_id: ClassVar[str] = "gpu_utilization_low"
    severity: ClassVar[str] = "info"

    @property
    def limit(self) -> float:
        return self.min_utilization_pct

    def reading(self, record: dict, gpus: _Gpus, run: RunFacts) -> tuple[float, bool] | None:
        utilization = record.get("utilization_pct")
        if utilization is None or run.last_step is None:
            return None
        key = gpu_key(record)
        window = gpus.windows.get(key)
        if window is None:
            window = gpus.windows[key] = Rolling(self.window)
        window.add(utilization < self.min_utilization_pct)
        return utilization, window.mostly()

    def describe(self, record: dict, value: float) -> str:
        return f"utilization {value:.0f}% < {self.min_utilization_pct:g}% over most of the last {self.window} samples"
