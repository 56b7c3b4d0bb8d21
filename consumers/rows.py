"""Decoded Avro records → ClickHouse rows. Tables mirror the schemas field for field; `ts_ms` becomes `ts`."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from operator import itemgetter

from trainwire.schemas.codec import latest

TABLE_FOR_KIND = {
    "run_started": "run_started",
    "step": "steps",
    "eval": "evals",
    "gpu_sample": "gpu_samples",
    "heartbeat": "heartbeats",
    "checkpoint": "checkpoints",
    "run_ended": "run_ended",
    "alert": "alerts",
}
_NESTED = {"files", "artifacts"}  # arrays of FileDigest records → Array(Tuple(name, size, sha256))


@cache
def fields_of(kind: str) -> tuple[str, ...]:
    return tuple(f["name"] for f in latest(kind).parsed["fields"])


@cache
def columns_of(kind: str) -> list[str]:
    return ["ts" if name == "ts_ms" else name for name in fields_of(kind)]


@cache
def _row_maker(kind: str) -> tuple[Callable[[dict], tuple], tuple[int, ...]]:
    nested = tuple(i for i, name in enumerate(fields_of(kind)) if name in _NESTED)
    return itemgetter(*fields_of(kind)), nested


def to_row(kind: str, record: dict) -> list:
    values, nested = _row_maker(kind)
    row = list(values(record))
    for i in nested:
        row[i] = [(f["name"], f["size"], f["sha256"]) for f in row[i]]
    return row
