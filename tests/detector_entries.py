"""The detector engine's two entries, for tests that must hold for both: events one at a time (`observe`, the
per-record ingest path) and frames (`observe_frames`, the columnar one) in batches of a given size.

`entry_engine(entry, ...)` makes an engine fed through the named entry; the `entry` fixture runs a test module's
tests once per entry, its `DetectorEngine` standing for `entry_engine` of that entry. Both kinds answer `observe` and `flush`:
per event, `observe` returns the event's alerts and `flush` nothing; framed, events wait until a batch is full,
`observe` returns the alerts of the batch it completes (else nothing) and `flush` judges what waits. A test reads
alerts after a `flush`, so its expectations are the same whatever the entry. The engine's other methods (tick,
forget, …) judge what waits first, keeping its alerts for the next `flush`.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest

from trainwire.consumers.detectors import DetectorEngine
from trainwire.schemas import EVENT_TYPES, Alert

from .frame_builder import decoded_of

ENTRIES = {"events": None, "frames-1": 1, "frames-7": 7, "frames-all": 0}  # batch size (0: until read)


class EventEntry:
    def __init__(self, engine: DetectorEngine):
        self.engine = engine

    def observe(self, kind: str, record: dict, source: Any = None) -> list[Alert]:
        return self.engine.observe(kind, record, source)

    def flush(self) -> list[Alert]:
        return []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


class FrameEntry:
    def __init__(self, engine: DetectorEngine, batch: int):
        self.engine = engine
        self.batch = batch
        self._waiting: list[tuple[str, dict, Any]] = []
        self._held: list[Alert] = []

    def observe(self, kind: str, record: dict, source: Any = None) -> list[Alert]:
        self._waiting.append((kind, record, source))
        if self.batch and len(self._waiting) >= self.batch:
            return self.flush()
        return []

    def flush(self) -> list[Alert]:
        waiting, self._waiting = self._waiting, []
        held, self._held = self._held, []
        if not waiting:
            return held
        decoded = decoded_of([EVENT_TYPES[kind].model_validate(record) for kind, record, _ in waiting])
        return held + self.engine.observe_frames(decoded.frames, [source for _, _, source in waiting])

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.engine, name)
        if not callable(attribute):
            return attribute

        def after_waiting(*args: Any, **kwargs: Any) -> Any:
            self._held = self.flush()
            return attribute(*args, **kwargs)

        return after_waiting


def entry_engine(entry: str, *args: Any, **kwargs: Any) -> EventEntry | FrameEntry:
    engine = DetectorEngine(*args, **kwargs)
    batch = ENTRIES[entry]
    return EventEntry(engine) if batch is None else FrameEntry(engine, batch)


@pytest.fixture(params=list(ENTRIES))
def entry(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(request.module, "DetectorEngine", partial(entry_engine, request.param))
    return request.param
