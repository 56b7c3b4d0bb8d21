"""The first step of ingest: polled records become events in the batch (stored rows or frames), dead letters with
their reasons, and the alerts the detectors raise on them.

Two ways, chosen by `ingest_path`: the columnar one (ClickHouse parses the whole poll, checks and detectors run on
columns; the default) and the per-record one (fastavro per record, detectors per event), kept as the reference
the columnar one is measured and tested against.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from trainwire.infra.log import Record
from trainwire.schemas import Codec, SchemaError

from .admission import Admission, DeadLetterBudget
from .batch import Batch
from .detectors import DetectorEngine, HistoryUnavailableError
from .frames import FrameDecoder, decode_one, reason_of
from .rows import to_row

log = logging.getLogger("trainwire.consumers.ingest")
DeadLetter = Callable[[Batch, Record, str], None]


class DetectorErrors:
    """Counts detector failures; the event is stored all the same: a detector bug must not stop ingest."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, what: str) -> None:
        self.count += 1
        if self.count == 1 or self.count % 1000 == 0:
            log.exception("ingest: detectors failed on %s (%d so far)", what, self.count)


class _Decoding:
    """What both ways share: the dead-letter budget told of every record, the detectors, and where dead letters
    and detector failures go."""

    def __init__(self, budget: DeadLetterBudget, detectors: DetectorEngine, dead_letter: DeadLetter,
                 detector_errors: DetectorErrors):
        self._budget = budget
        self._detectors = detectors
        self._dead_letter = dead_letter
        self._errors = detector_errors


class RecordDecoding(_Decoding):
    """Per record: fastavro decodes, the models' checks validate, the detectors observe one event at a time."""

    def __init__(self, codec: Codec, admission: Admission, budget: DeadLetterBudget, detectors: DetectorEngine,
                 dead_letter: DeadLetter, detector_errors: DetectorErrors):
        super().__init__(budget, detectors, dead_letter, detector_errors)
        self._codec = codec
        self._admission = admission

    def add(self, records: list[Record], batch: Batch) -> None:
        now_ms = time.time_ns() // 1_000_000
        decoded = [decode_one(self._codec, self._admission, record, now_ms) for record in records]
        self._detectors.prefetch(event for event in decoded if not isinstance(event, SchemaError))
        for record, event in zip(records, decoded):
            self._process(batch, record, event)

    def _process(self, batch: Batch, record: Record, event: tuple[str, dict] | SchemaError) -> None:
        batch.records.append(record)
        if isinstance(event, SchemaError):
            self._dead_letter(batch, record, reason_of(event))
            return
        kind, fields = event
        try:
            row = to_row(kind, fields)
        except Exception as err:
            self._dead_letter(batch, record, f"cannot make a {kind} row: {err!r}")
            return
        self._budget.observe(False)
        batch.rows[kind].append(row)
        batch.sources[kind].append(record)
        try:
            alerts = self._detectors.observe(kind, fields, (record.topic, record.partition))
        except HistoryUnavailableError:
            raise
        except Exception:
            self._errors(f"a {kind} event of run {fields.get('run_id')}")
            alerts = []
        if alerts:
            batch.add_alerts(alerts)
        if kind == "run_ended":
            batch.ended_runs.append(fields["run_id"])


class ColumnarDecoding(_Decoding):
    """Per poll: ClickHouse parses the bodies into columns (FrameDecoder), which the detectors read as arrays."""

    def __init__(self, decoder: FrameDecoder, budget: DeadLetterBudget, detectors: DetectorEngine,
                 dead_letter: DeadLetter, detector_errors: DetectorErrors):
        super().__init__(budget, detectors, dead_letter, detector_errors)
        self._decoder = decoder

    def add(self, records: list[Record], batch: Batch) -> None:
        decoded = self._decoder.decode(records, time.time_ns() // 1_000_000)
        first = len(batch.records)
        batch.records.extend(records)
        self._observe_dead_letters(batch, records, decoded.dead_letters)
        if not decoded.frames:
            return
        batch.decoded.append((first, decoded))
        try:
            alerts = self._detectors.observe_frames(decoded.frames, [(r.topic, r.partition) for r in records])
        except HistoryUnavailableError:
            raise
        except Exception:
            self._errors(f"a batch of {len(records)} records")
            alerts = []
        if alerts:
            batch.add_alerts(alerts)
        if (ended := decoded.frames.get("run_ended")) is not None:
            batch.ended_runs.extend(ended.table.column("run_id").to_pylist())

    def _observe_dead_letters(self, batch: Batch, records: list[Record], dead_letters: list[tuple[int, str]]) -> None:
        """Tell the budget of every record in order, as the per-record path does, visiting only the dead ones."""
        after = -1
        for index, reason in dead_letters:
            if index != after + 1:
                self._budget.observe(False)
            self._dead_letter(batch, records[index], reason)
            after = index
        if after != len(records) - 1:
            self._budget.observe(False)
