"""`run_stalled`: a run that stops sending events. Judged on the engine's clock (`DetectorEngine.tick`), not
on an event, since the whole point is that no event comes.

Silence is counted from the first tick after the run's latest event, on the consumer's clock, and only while the
consumer has read all that the run's partitions hold: catching up on a backlog it reads some partitions well
before others, and the runs on those waiting are silent only to it. Producer clock skew does not matter. The expected interval is learned from the run's own events (the
largest of the last `window` gaps between their timestamps, at least `min_interval_s`; heartbeats every few
seconds keep it small while the process lives). GPU samples do not count: they travel on their own topic,
possibly to another consumer than the run's other events.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import ClassVar

from .base import Rule


@dataclass
class RunStalled(Rule):
    factor: float
    window: int
    min_interval_s: float
    rule_id: ClassVar[str] = "run_stalled"
    severity: ClassVar[str] = "critical"
    kinds: ClassVar[frozenset[str]] = frozenset()  # the engine's tick drives it, not events

    def expected_ms(self, gaps: deque[int]) -> float:
        return max(self.min_interval_s * 1000.0, max(gaps, default=0))

    def message(self, silent_ms: int, expected_ms: float) -> str:
        return (f"no events for {silent_ms / 1000:.0f} s (> {self.factor:g} × the expected interval of "
                f"{expected_ms / 1000:.1f} s): the run may have hung or died")
