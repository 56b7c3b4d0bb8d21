"""Rules over GPU samples. State is kept per GPU (host, GPU); the alert is per (run, rule) as everywhere else.

One incident per run and rule, not per GPU: a run that overheats pages once, however many of its GPUs are hot,
and resolves when none is. The message names the GPU that raised it and how many are affected; the per-GPU
readings are in the Resources view.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from operator import attrgetter
from typing import ClassVar

import numpy as np

from .base import QUIET, Bulk, Finding, Rolling, Rule, RunFacts
from .columns import RunRows

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

    def readings(self, rows: RunRows) -> tuple[np.ndarray, np.ndarray] | None:
        """`reading` over many rows: (whether the sample says, whether its GPU is affected); None: the rule
        reads samples one by one only."""
        return None

    def bulk(self, rows: RunRows, states: list[_Gpus]) -> Bulk | None:
        """Quiet where no GPU was affected before the batch and no sample of it is."""
        readings = self.readings(rows)
        if readings is None:
            return None
        read, affected = readings
        none_before = np.array([not gpus.affected for gpus in states], dtype=bool)
        return Bulk(none_before & ~rows.any(affected), rows.any(read))


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

    def readings(self, rows: RunRows) -> tuple[np.ndarray, np.ndarray]:
        used, has_used = rows.column("memory_used_mb")
        total, has_total = rows.column("memory_total_mb")
        with np.errstate(invalid="ignore", divide="ignore"):
            read = has_used & has_total & ~(total <= 0)  # a NaN total is read (and never affected), as in `reading`
            return read, read & (used / total >= self.used_fraction)

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

    def readings(self, rows: RunRows) -> tuple[np.ndarray, np.ndarray]:
        temperatures, read = rows.column("temperature_c")
        return read, read & (temperatures >= self.celsius)

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

    def bulk(self, rows: RunRows, states: list[_Gpus]) -> Bulk:
        """Quiet where no GPU was affected before and no GPU's window can turn mostly low: its low samples
        before plus the run's new ones are at most half a window. Counts only samples taken once the run has
        logged a step, as the batch found it (the engine judges event by event a run whose first step is in
        the batch)."""
        utilization, present = rows.column("utilization_pct")
        read = present & rows.per_run(np.array([facts.last_step is not None for facts in rows.facts], dtype=bool))
        low = read & (utilization < self.min_utilization_pct)
        lows_before = np.array([max(map(_TOTAL, gpus.windows.values()), default=0.0) for gpus in states])
        none_before = np.array([not gpus.affected for gpus in states], dtype=bool)
        quiet = none_before & (2 * (lows_before + rows.count(low)) <= self.window)
        ends = np.cumsum(rows.count(read)).tolist()
        samples = _Samples(self.window, rows, read, low)
        return Bulk(quiet, rows.any(read), list(zip([0, *ends[:-1]], ends)), samples.add)


_TOTAL = attrgetter("total")


class _Samples:
    """A batch's utilization readings of several runs, to bring each run's per-GPU windows forward
    (GpuUtilizationLow.bulk); a run's are those in [start, end)."""

    def __init__(self, window: int, rows: RunRows, read: np.ndarray, low: np.ndarray):
        self.window = window
        reading = np.flatnonzero(read)
        hosts, self.host_names = rows.codes("host")
        uuids, self.uuid_names = rows.codes("gpu_uuid")
        indexes, _ = rows.column("gpu_index")
        self.hosts, self.uuids = hosts[reading].tolist(), uuids[reading].tolist()
        self.indexes, self.lows = indexes[reading].tolist(), low[reading].tolist()

    def add(self, gpus: _Gpus, bounds: tuple[int, int]) -> None:
        """`reading` for each of the run's samples, in order."""
        windows, size, lows = gpus.windows, self.window, self.lows
        hosts, host_names, uuids, uuid_names, indexes = (self.hosts, self.host_names, self.uuids, self.uuid_names,
                                                         self.indexes)
        for i in range(*bounds):
            low = lows[i]
            key = host_names[hosts[i]], uuid_names[uuids[i]] or str(indexes[i])
            window = windows.get(key)
            if window is None:
                window = windows[key] = Rolling(size)
            elif not low and not window.total and len(window.values) == size:
                continue  # a full window of clear samples is the same after one more
            window.add(low)
