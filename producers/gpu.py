"""GPU sampler: a daemon thread reading NVML every few seconds, for the GPUs this job may use."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger(__name__)
Reading = dict[str, Any]


class GpuSource(Protocol):
    def read(self) -> list[Reading]: ...


def visible_indices(device_count: int, visible: str | None) -> list[int]:
    """Physical indices named by CUDA_VISIBLE_DEVICES (indices only; UUID entries keep every GPU)."""
    if visible is None:
        return list(range(device_count))
    if not visible.strip():
        return []
    picked = []
    for item in visible.split(","):
        item = item.strip()
        if not item.isdigit():
            return list(range(device_count))
        if int(item) < device_count:
            picked.append(int(item))
    return picked


class NvmlSource:
    """Readings from pynvml. Raises RuntimeError at construction when there is no driver or no GPU."""

    def __init__(self) -> None:
        import pynvml

        self._nvml = pynvml
        try:
            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
        except pynvml.NVMLError as err:
            raise RuntimeError(f"NVML unavailable: {err}") from err
        indices = visible_indices(count, os.environ.get("CUDA_VISIBLE_DEVICES"))
        if not indices:
            raise RuntimeError("no GPU visible to this job")
        self._handles = [(i, pynvml.nvmlDeviceGetHandleByIndex(i)) for i in indices]

    def _try(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except self._nvml.NVMLError:
            return None  # a GPU that lacks this reading

    def read(self) -> list[Reading]:
        nv = self._nvml
        readings = []
        for index, handle in self._handles:
            util = self._try(lambda: nv.nvmlDeviceGetUtilizationRates(handle))
            mem = self._try(lambda: nv.nvmlDeviceGetMemoryInfo(handle))
            power = self._try(lambda: nv.nvmlDeviceGetPowerUsage(handle))
            name = self._try(lambda: nv.nvmlDeviceGetName(handle)) or ""
            readings.append({
                "gpu_index": index,
                "gpu_uuid": self._try(lambda: nv.nvmlDeviceGetUUID(handle)) or f"gpu-{index}",
                "gpu_name": name.decode() if isinstance(name, bytes) else name,
                "utilization_pct": float(util.gpu) if util is not None else None,
                "memory_used_mb": mem.used / 2**20 if mem is not None else None,
                "memory_total_mb": mem.total / 2**20 if mem is not None else None,
                "temperature_c": self._try(lambda: float(nv.nvmlDeviceGetTemperature(handle, nv.NVML_TEMPERATURE_GPU))),
                "power_w": power / 1000.0 if power is not None else None,
                "sm_clock_mhz": self._try(lambda: float(nv.nvmlDeviceGetClockInfo(handle, nv.NVML_CLOCK_SM))),
                "mem_clock_mhz": self._try(lambda: float(nv.nvmlDeviceGetClockInfo(handle, nv.NVML_CLOCK_MEM))),
            })
        return readings


class GpuSampler:
    """Samples `source` every `interval` seconds into `emit(**reading)` until stopped."""

    def __init__(self, emit: Callable[..., None], interval: float, rank: int = 0, source: GpuSource | None = None):
        self._emit = emit
        self._interval = interval
        self._rank = rank
        self._source = source
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        """Start sampling; False (with one informational log line) when this node has no usable GPU."""
        if self._source is None:
            try:
                self._source = NvmlSource()
            except (RuntimeError, ImportError, OSError) as err:
                log.info("trainwire: no GPU samples for this run (%s)", err)
                return False
        self._thread = threading.Thread(target=self._loop, name="trainwire-gpu", daemon=True)
        self._thread.start()
        return True

    def _loop(self) -> None:
        while True:
            try:
                for reading in self._source.read():
                    self._emit(rank=self._rank, **reading)
            except Exception:
                log.exception("trainwire: GPU sampling failed; trying again next interval")
            if self._stop.wait(self._interval):
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
