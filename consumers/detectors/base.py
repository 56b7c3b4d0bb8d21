"""What every rule shares: the verdict type, the rule interface and the run facts rules may read."""

from __future__ import annotations

import math
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from pydantic import BaseModel

if TYPE_CHECKING:
    from .columns import RunRows

# Alert ids derive from the incident, so an event replayed after a crash re-creates the same alert row, and an
# incident found in the store can be told for one the detectors raised.
_ALERT_NAMESPACE = uuid.UUID("6f1c0b1e-7d0a-4d53-9a55-2f3b8b7e2a10")


def alert_id(dedup_key: str, state: str) -> str:
    return str(uuid.uuid5(_ALERT_NAMESPACE, f"{dedup_key}/{state}"))


def raised_by_detectors(run_id: str, rule: str, dedup_key: str, firing_id: str) -> bool:
    """True for an incident the detectors opened: its key names its run and rule, and its firing alert has the id
    the detectors give it. Anything else in the alerts table (forged, or written by hand) is never adopted."""
    return dedup_key.startswith(f"{run_id}/{rule}/") and firing_id == alert_id(dedup_key, "firing")


@dataclass(frozen=True)
class Finding:
    """The rule's verdict on one event: `active` says whether the condition holds now.

    `value` is what the alert reports: the offending reading when active, the clearing one when not (None: the
    record's `field`).
    """

    active: bool
    value: float | None = None
    threshold: float | None = None
    message: str = ""


QUIET = Finding(False)  # the common verdict, shared: no object per event when nothing is wrong


@dataclass
class Bulk:
    """A rule's verdict on the readings of several runs in one batch (`Rule.bulk`), reached from each run's state
    without changing it.

    For run i: `quiet[i]` vouches that `check` would find no reading active (False also where the rule cannot
    tell cheaply: those runs are judged event by event); `judged[i]` says some reading gives a finding, which
    resets the rule's streak; `apply(state, updates[i])` leaves the state where `check` on each reading would
    (an update None: the state is already there).
    """

    quiet: np.ndarray
    judged: np.ndarray
    updates: Sequence[Any] = ()
    apply: Callable[[Any, Any], None] | None = None


class Rule:
    rule_id: ClassVar[str]
    severity: ClassVar[str]
    kinds: ClassVar[frozenset[str]]
    field: ClassVar[str] = ""  # the record field the rule watches: a resolved alert reports its clearing value

    @classmethod
    def from_settings(cls, settings: BaseModel) -> Rule:
        """The rule with the parameters of its `[detectors.<rule_id>]` settings (its dataclass fields)."""
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})  # type: ignore[arg-type]

    def new_state(self) -> Any:
        return None

    def check(self, record: dict, state: Any, run: RunFacts) -> Finding | None:
        """None when the event says nothing about this rule (e.g. a step without a loss)."""
        raise NotImplementedError

    def bulk(self, rows: RunRows, states: list[Any]) -> Bulk | None:
        """The verdict on a batch's readings of several runs at once (`states[i]` is run i's state); None: this
        rule is judged event by event only."""
        return None


def is_finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


class Rolling:
    """The last `window` numbers and their sum, O(1) per number; `add` returns the one that fell out, if any."""

    __slots__ = ("window", "values", "total")

    def __init__(self, window: int):
        self.window = window
        self.values: deque[float] = deque(maxlen=window)
        self.total = 0.0

    def add(self, value: float) -> float | None:
        values = self.values
        if len(values) < self.window:
            values.append(value)
            self.total += value
            return None
        dropped = values[0]
        values.append(value)  # pushes `dropped` out
        self.total += value - dropped
        return dropped

    def extend(self, new: Iterable[float]) -> None:
        """`add` each number in turn (the same sums, to the bit), without the per-call overhead."""
        values, window, total = self.values, self.window, self.total
        for value in new:
            if len(values) < window:
                total += value
            else:
                total += value - values[0]
            values.append(value)
        self.total = total

    @property
    def full(self) -> bool:
        return len(self.values) == self.window

    def mostly(self) -> bool:
        """For 0/1 readings: the window is full and more than half of it is 1 ("sustained", not one blip)."""
        return len(self.values) == self.window and 2 * self.total > self.window


TRAIN_LOSS_LOGS = 5  # logged train losses averaged into the "current train loss" that evals are compared with


class RunFacts:
    """What the engine keeps about a run for rules that relate one kind of event to another."""

    __slots__ = ("recent_losses", "last_step")

    def __init__(self) -> None:
        self.recent_losses = Rolling(TRAIN_LOSS_LOGS)
        self.last_step: int | None = None

    @property
    def train_loss(self) -> float | None:
        """The current train loss: the mean of the last few logged finite losses, so that one noisy batch does
        not decide an eval-versus-train comparison."""
        count = len(self.recent_losses.values)
        return self.recent_losses.total / count if count else None
