"""Rules over evaluations, relating them to the train loss and to checkpoints."""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import ClassVar

from .base import QUIET, Finding, Rule, RunFacts, is_finite

EVAL = frozenset({"eval"})
REMEMBERED_CHECKPOINTS = 50  # checkpoints without an eval loss, by step, to name the one at the best eval


@dataclass
class _EvalTrend:
    rising: int = 0  # consecutive evals whose loss rose
    last_eval_loss: float | None = None
    base: tuple[float, float | None] | None = None  # (eval loss, train loss) where the current rise began
    best_eval: tuple[float, int] | None = None  # (eval loss, step)
    best_checkpoint: tuple[str, int, float | None, bool] | None = None  # (path, step, eval loss, flagged best)
    checkpoints: OrderedDict[int, str] = field(default_factory=OrderedDict)


@dataclass
class Overfitting(Rule):
    """Eval loss above `ratio` × the current train loss, or eval loss rising `rising_evals` evals in a row (by at
    least `min_rise` in all) while the train loss fell over the same evals. The alert says to stop and names the best checkpoint so far: the
    one the trainer flagged best, else the one with the lowest eval loss, else the one saved at the best eval."""

    ratio: float
    rising_evals: int
    min_rise: float
    min_gap: float
    field: ClassVar[str] = "eval_loss"
    rule_id: ClassVar[str] = "overfitting"
    severity: ClassVar[str] = "warning"
    kinds: ClassVar[frozenset[str]] = frozenset({"eval", "checkpoint"})

    def new_state(self) -> _EvalTrend:
        return _EvalTrend()

    def check(self, record: dict, trend: _EvalTrend, run: RunFacts) -> Finding | None:
        if "path" in record:
            self._note_checkpoint(record, trend)
            return None
        eval_loss = record.get("eval_loss")
        if not is_finite(eval_loss):
            return None
        train_loss = run.train_loss
        if trend.best_eval is None or eval_loss < trend.best_eval[0]:
            trend.best_eval = (eval_loss, record["step"])
        if trend.last_eval_loss is not None and eval_loss > trend.last_eval_loss:
            trend.rising += 1
        else:
            trend.rising, trend.base = 0, (eval_loss, train_loss)
        trend.last_eval_loss = eval_loss

        if (train_loss is not None and train_loss > 0 and eval_loss > self.ratio * train_loss
                and eval_loss - train_loss >= self.min_gap):
            return Finding(True, eval_loss, self.ratio * train_loss,
                           f"eval loss {eval_loss:.4g} > {self.ratio:g} × train loss {train_loss:.4g}; "
                           f"{self._best(trend)}")
        base_eval, base_train = trend.base
        if (trend.rising >= self.rising_evals and eval_loss >= (1 + self.min_rise) * base_eval
                and base_train is not None and train_loss is not None and train_loss < base_train):
            return Finding(True, eval_loss, base_eval,
                           f"eval loss rose {trend.rising} evals in a row ({base_eval:.4g} → {eval_loss:.4g}) while "
                           f"train loss fell ({base_train:.4g} → {train_loss:.4g}): stop here; {self._best(trend)}")
        return QUIET

    @staticmethod
    def _note_checkpoint(record: dict, trend: _EvalTrend) -> None:
        path, step, eval_loss, is_best = record["path"], record["step"], record.get("eval_loss"), record.get("is_best")
        best = trend.best_checkpoint
        if is_best:
            trend.best_checkpoint = (path, step, eval_loss, True)
        elif is_finite(eval_loss) and is_best is None and (
                best is None or (not best[3] and (best[2] is None or eval_loss < best[2]))):
            trend.best_checkpoint = (path, step, eval_loss, False)
        trend.checkpoints[step] = path
        if len(trend.checkpoints) > REMEMBERED_CHECKPOINTS:
            trend.checkpoints.popitem(last=False)

    @staticmethod
    def _best(trend: _EvalTrend) -> str:
        if trend.best_checkpoint is not None and (trend.best_checkpoint[3] or trend.best_checkpoint[2] is not None):
            path, step, eval_loss, _ = trend.best_checkpoint
            loss = f", eval loss {eval_loss:.4g}" if eval_loss is not None else ""
            return f"best checkpoint so far: {path} (step {step}{loss})"
        best_loss, best_step = trend.best_eval
        if best_step in trend.checkpoints:
            path = trend.checkpoints[best_step]
            return f"best checkpoint so far: {path} (step {best_step}, eval loss {best_loss:.4g})"
        return f"best eval so far: step {best_step} (eval loss {best_loss:.4g}), no checkpoint saved at that step"


@dataclass
class GeneralizationGap(Rule):
    """Eval loss / current train loss ≥ `ratio`, eval loss above it by at least `min_gap`; the alert's value is
    the ratio."""

    ratio: float
    min_gap: float
    rule_id: ClassVar[str] = "generalization_gap"
    severity: ClassVar[str] = "warning"
    kinds: ClassVar[frozenset[str]] = EVAL

    def check(self, record: dict, state: None, run: RunFacts) -> Finding | None:
        eval_loss, train_loss = record.get("eval_loss"), run.train_loss
        if not is_finite(eval_loss) or train_loss is None or train_loss <= 0:
            return None
        gap = eval_loss / train_loss
        if gap < self.ratio or eval_loss - train_loss < self.min_gap:
            return Finding(False, gap)
        return Finding(True, gap, self.ratio, f"eval/train loss ratio {gap:.3g} ≥ {self.ratio:g} "
                                              f"(eval {eval_loss:.4g}, train {train_loss:.4g})")


@dataclass
class PerplexityHigh(Rule):
    """Perplexity above `max_perplexity`: the reported one, else exp(eval loss), compared in log space (no
    overflow however large the loss)."""

    max_perplexity: float
    field: ClassVar[str] = "perplexity"
    rule_id: ClassVar[str] = "perplexity_high"
    severity: ClassVar[str] = "warning"
    kinds: ClassVar[frozenset[str]] = EVAL

    def check(self, record: dict, state: None, run: RunFacts) -> Finding | None:
        perplexity = record.get("perplexity")
        if perplexity is None or math.isnan(perplexity):
            eval_loss = record.get("eval_loss")
            if eval_loss is None or math.isnan(eval_loss):
                return None
            too_high = eval_loss > math.log(self.max_perplexity)
            perplexity = math.exp(eval_loss) if eval_loss < 709 else math.inf  # exp overflows past ~709.78
        else:
            too_high = perplexity > self.max_perplexity
        if not too_high:
            return Finding(False, perplexity)
        return Finding(True, perplexity, self.max_perplexity,
                       f"perplexity {perplexity:.4g} > {self.max_perplexity:g} at step {record['step']}")


@dataclass
class EvalAccuracyLow(Rule):
    """Eval accuracy below the configured `baseline`; silent for runs without one."""

    baseline: float | None
    field: ClassVar[str] = "eval_accuracy"
    rule_id: ClassVar[str] = "eval_accuracy_low"
    severity: ClassVar[str] = "warning"
    kinds: ClassVar[frozenset[str]] = EVAL

    def check(self, record: dict, state: None, run: RunFacts) -> Finding | None:
        accuracy = record.get("eval_accuracy")
        if self.baseline is None or accuracy is None or math.isnan(accuracy):
            return None
        if accuracy >= self.baseline:
            return QUIET
        return Finding(True, accuracy, self.baseline,
                       f"eval accuracy {accuracy:.4g} < baseline {self.baseline:g} at step {record['step']}")
