"""What ingest admits beyond the schema: each topic carries only the kinds producers publish on it, and every
event is dated within a window the store can hold. The columns' value ranges are the models' bounds
(schemas/events.py), checked by `check_record`; what fails here or there becomes a dead letter with its reason.
"""

from __future__ import annotations

import time
from collections import deque
from datetime import datetime, timezone

import numpy as np

from trainwire.infra.config import Settings
from trainwire.infra.log.topics import CONSUMER_TOPICS, topic_for
from trainwire.schemas import EVENT_TYPES, SchemaError

DAY_MS = 86_400_000
RATIO_WINDOW = 10_000  # records over which the dead-letter ratio is judged…
RATIO_MIN_SEEN = 1_000  # …once this many have been seen


class RejectedEventError(SchemaError):
    """A well-formed event that ingest does not accept here or now."""


class DeadLetterLimitError(RuntimeError):
    """So many records became dead letters that something upstream is broken: stop rather than bury them all."""


def accepted_kinds(settings: Settings) -> dict[str, frozenset[str]]:
    """Full topic name → the kinds producers publish on it (alerts and stop commands are made by consumers)."""
    by_topic: dict[str, set[str]] = {}
    for kind in EVENT_TYPES:
        if topic_for(kind) not in CONSUMER_TOPICS:
            by_topic.setdefault(settings.topic(topic_for(kind)), set()).add(kind)
    return {topic: frozenset(kinds) for topic, kinds in by_topic.items()}


def _iso(ts_ms: int) -> str:
    try:
        return datetime.fromtimestamp(ts_ms / 1000, timezone.utc).isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return f"{ts_ms} ms"


class Admission:
    def __init__(self, settings: Settings):
        self._kinds = accepted_kinds(settings)
        self._back_ms = int(settings.accept_days_back * DAY_MS)
        self._ahead_ms = int(settings.accept_days_ahead * DAY_MS)
        self._settings = settings

    def accepts(self, topic: str, kind: str) -> bool:
        """Whether `kind` events may arrive on `topic` (a topic ingest does not know carries any kind)."""
        kinds = self._kinds.get(topic)
        return kinds is None or kind in kinds

    def outside_window(self, ts_ms: np.ndarray, now_ms: int) -> np.ndarray:
        """The columnar form of the date check: which of these `ts_ms` (int64) `check` would refuse."""
        return (ts_ms < now_ms - self._back_ms) | (ts_ms > now_ms + self._ahead_ms)

    def check(self, topic: str, kind: str, fields: dict, now_ms: int | None = None) -> None:
        """Raise RejectedEventError unless a `kind` event may arrive on `topic`, dated as `fields` says."""
        if not self.accepts(topic, kind):
            raise RejectedEventError(f"{kind} events are not accepted on topic {topic} (it carries "
                                     f"{', '.join(sorted(self._kinds[topic]))})")
        ts_ms = fields.get("ts_ms")
        if ts_ms is None:
            return
        now_ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        if not now_ms - self._back_ms <= ts_ms <= now_ms + self._ahead_ms:
            raise RejectedEventError(
                f"ts_ms {ts_ms} ({_iso(ts_ms)}) is outside the accepted window of {self._settings.accept_days_back:g} "
                f"days back to {self._settings.accept_days_ahead:g} days ahead (TRAINWIRE_ACCEPT_DAYS_BACK, "
                f"TRAINWIRE_ACCEPT_DAYS_AHEAD)")


class DeadLetterBudget:
    """Counts dead letters in a row (per record) and their share of the last RATIO_WINDOW records (per batch, judged
    before the batch is committed). A batch dropped and read again is not counted twice: `rollback` forgets the
    records seen since the last `commit`."""

    def __init__(self, max_consecutive: int, max_ratio: float):
        self._max_consecutive = max_consecutive
        self._max_ratio = max_ratio
        self._consecutive = self._committed_consecutive = 0
        self._batches: deque[tuple[int, int]] = deque()  # (records, dead letters) of committed batches
        self._records = self._dead = 0  # their sums

    def observe(self, dead: bool, reason: str = "") -> None:
        if not dead:
            self._consecutive = 0
            return
        self._consecutive += 1
        if self._consecutive >= self._max_consecutive:
            raise DeadLetterLimitError(
                f"{self._consecutive} records in a row went to the dead letters (last: {reason[:300]}); stopped "
                f"without committing them: fix the cause and restart, or raise TRAINWIRE_DEAD_LETTER_MAX_CONSECUTIVE")

    def judge(self, records: int, dead: int, reason: str = "") -> None:
        """Before committing a batch of `records` of which `dead` are dead letters: raise if, with it, too many
        of the recent records were."""
        total, bad = self._records + records, self._dead + dead
        if dead and total >= RATIO_MIN_SEEN and bad > self._max_ratio * total:
            raise DeadLetterLimitError(
                f"{bad} of the last {total} records went to the dead letters (last: {reason[:300]}); stopped "
                f"without committing them: fix the cause and restart, or raise TRAINWIRE_DEAD_LETTER_MAX_RATIO")

    def commit(self, records: int, dead: int) -> None:
        self._batches.append((records, dead))
        self._records += records
        self._dead += dead
        while self._batches and self._records - self._batches[0][0] >= RATIO_WINDOW:
            old_records, old_dead = self._batches.popleft()
            self._records -= old_records
            self._dead -= old_dead
        self._committed_consecutive = self._consecutive

    def rollback(self) -> None:
        self._consecutive = self._committed_consecutive
