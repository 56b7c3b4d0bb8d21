"""Detector rules. A rule looks at one event and its run's state and says whether its condition holds."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class Finding:
    """The rule's verdict on one event: `active` says whether the condition holds now."""

    active: bool
    value: float | None = None
    threshold: float | None = None
    message: str = ""


QUIET = Finding(False)  # the common verdict, shared: no object per event when nothing is wrong


class Rule:
    rule_id: ClassVar[str]
    severity: ClassVar[str]
    kinds: ClassVar[frozenset[str]]
    field: ClassVar[str]  # the record field the rule watches: a resolved alert reports its clearing value

    def new_state(self) -> Any:
        return None

    def check(self, record: dict, state: Any) -> Finding | None:
        """None when the event says nothing about this rule (e.g. a step without a loss)."""
        raise NotImplementedError


@dataclass
class LossNotFinite(Rule):
    field: ClassVar[str] = "loss"
    rule_id: ClassVar[str] = "loss_not_finite"
    severity: ClassVar[str] = "block"
    kinds: ClassVar[frozenset[str]] = frozenset({"step"})

    def check(self, record: dict, state: None) -> Finding | None:
        loss = record.get("loss")
        if loss is None:
            return None
        if math.isfinite(loss):
            return QUIET
        return Finding(True, loss, None, f"train loss is {loss} at step {record['step']}")


@dataclass
class LossSpike(Rule):
    """Loss above `factor` × the median of the last `window` finite losses (after `min_history` of them)."""

    factor: float = 1.5
    window: int = 10
    min_history: int = 3
    field: ClassVar[str] = "loss"
    rule_id: ClassVar[str] = "loss_spike"
    severity: ClassVar[str] = "critical"
    kinds: ClassVar[frozenset[str]] = frozenset({"step"})

    def new_state(self) -> deque:
        return deque(maxlen=self.window)

    def check(self, record: dict, history: deque) -> Finding | None:
        loss = record.get("loss")
        if loss is None or not math.isfinite(loss):
            return None
        finding = None
        if len(history) >= self.min_history:
            ordered = sorted(history)
            middle = len(ordered) // 2
            baseline = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
            threshold = self.factor * baseline
            if baseline > 0 and loss > threshold:
                finding = Finding(True, loss, threshold,
                                  f"loss {loss:.4g} > {self.factor} × recent median {baseline:.4g}")
            else:
                finding = QUIET
        if finding is None or not finding.active:
            history.append(loss)  # a spike does not become part of its own baseline
        return finding


@dataclass
class GradNormHigh(Rule):
    threshold: float = 10.0
    field: ClassVar[str] = "grad_norm"
    rule_id: ClassVar[str] = "grad_norm_high"
    severity: ClassVar[str] = "warning"
    kinds: ClassVar[frozenset[str]] = frozenset({"step"})

    def check(self, record: dict, state: None) -> Finding | None:
        grad_norm = record.get("grad_norm")
        if grad_norm is None:
            return None
        if math.isfinite(grad_norm) and grad_norm <= self.threshold:
            return QUIET
        return Finding(True, grad_norm, self.threshold, f"grad norm {grad_norm:.4g} > {self.threshold:g}")


def default_rules() -> list[Rule]:
    return [LossNotFinite(), LossSpike(), GradNormHigh()]


