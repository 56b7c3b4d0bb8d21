"""What ingest holds between polling records and committing them: the records, what they became (rows on the
per-record path, frames on the columnar path), their dead letters and the alerts they raised."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from trainwire.infra.log import Record
from trainwire.schemas import Alert

from .frames import Decoded, Frame

PAGE_NOW = frozenset({"critical", "block"})  # a batch holding such a firing alert is flushed at once: someone waits


@dataclass
class Batch:
    records: list[Record] = field(default_factory=list)
    rows: dict[str, list[list]] = field(default_factory=lambda: defaultdict(list))
    sources: dict[str, list[Record]] = field(default_factory=lambda: defaultdict(list))  # parallel to rows
    decoded: list[tuple[int, Decoded]] = field(default_factory=list)  # (position of its first record, frames)
    dead_letters: list[list] = field(default_factory=list)
    dead_letter_keys: list[bytes | None] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)
    ended_runs: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    urgent: bool = False

    def __bool__(self) -> bool:
        return bool(self.records or self.alerts)

    def add_alerts(self, alerts: list[Alert]) -> None:
        if not self:
            self.started = time.monotonic()
        self.alerts.extend(alerts)
        self.urgent = self.urgent or any(a.state == "firing" and a.severity in PAGE_NOW for a in alerts)

    def add_dead_letter(self, record: Record, reason: str) -> None:
        self.dead_letters.append([record.topic, record.partition, record.offset, reason, record.value or b""])
        self.dead_letter_keys.append(record.key)

    def frames(self) -> dict[str, Frame]:
        """Every poll's frames joined per kind, positions counted over the whole batch."""
        by_kind: dict[str, list[Frame]] = defaultdict(list)
        for first, decoded in self.decoded:
            for kind, frame in decoded.frames.items():
                by_kind[kind].append(_shifted(frame, first))
        return {kind: frames[0] if len(frames) == 1 else _joined(frames) for kind, frames in by_kind.items()}


def _shifted(frame: Frame, first: int) -> Frame:
    if not first:
        return frame
    return Frame(frame.kind, frame.table, frame.positions + first, frame.bodies, frame.writer_ids, frame.writers)


def _joined(frames: list[Frame]) -> Frame:
    writers: list[str] = []
    writer_ids = []
    for frame in frames:
        index = [_index_of(writers, writer) for writer in frame.writers]
        writer_ids.append(np.asarray(index, dtype=np.int32)[frame.writer_ids])
    return Frame(frames[0].kind, pa.concat_tables([f.table for f in frames]),
                 np.concatenate([f.positions for f in frames]), [b for f in frames for b in f.bodies],
                 np.concatenate(writer_ids), writers)


def _index_of(items: list[str], item: str) -> int:
    if item not in items:
        items.append(item)
    return items.index(item)
