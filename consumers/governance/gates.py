"""Quality gates G1–G6 (spec §5): pure functions over a run's plain data, no store.

A gate's verdict is `passed`, `failed`, `no_data` (nothing to judge it on: it says so and does not fail) or
`no_baseline` (G4/G5 without a baseline: passes informationally). Overall: `blocked` when a block gate failed,
else `warnings` when a warn gate failed, else `passed`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from .audit import missing_from_audit

Status = Literal["passed", "failed", "no_data", "no_baseline"]
Overall = Literal["passed", "warnings", "blocked"]
EXIT_CODES: dict[str, int] = {"passed": 0, "warnings": 1, "blocked": 2}

# Metric direction for G4. Any other metric needs an explicit `name:higher` / `name:lower`.
LOWER_IS_BETTER = frozenset({"eval_loss", "train_loss", "perplexity"})
HIGHER_IS_BETTER = frozenset({"eval_accuracy", "exact_match", "f1", "rouge1", "rougeL", "bleu", "mmlu",
                              "human_eval"})
DEFAULT_BASELINE_METRICS = ("eval_loss", "eval_accuracy", "train_loss")

# G5: the eval metrics map keys (an `eval_` prefix is ignored) read as each task metric.
TASK_METRIC_KEYS: dict[str, tuple[str, ...]] = {
    "exact_match": ("exact_match", "em"),
    "f1": ("f1",),
    "rouge1": ("rouge1", "rouge_1", "rouge-1"),
    "rougeL": ("rougeL", "rouge_l", "rouge-l", "rougeLsum"),
    "bleu": ("bleu",),
    "mmlu": ("mmlu", "mmlu_accuracy"),
    "human_eval": ("human_eval", "human_eval_score"),
}
# Fractions in [0, 1]; a logged value above 1 is a percentage (HF `evaluate`'s squad metric reports 0–100).
FRACTION_METRICS = frozenset({"exact_match", "f1", "rouge1", "rougeL", "bleu", "mmlu"})


@dataclass(frozen=True)
class GatePolicy:
    """The thresholds; defaults are spec §5."""

    generalisation_ratio: float = 1.2
    baseline_tolerance: float = 0.05
    task_minimums: dict[str, float] = field(default_factory=lambda: {
        "exact_match": 0.8, "f1": 0.8, "rouge1": 0.3, "rougeL": 0.3, "bleu": 0.3, "human_eval": 3.5})


@dataclass(frozen=True)
class EvalPoint:
    step: int
    eval_loss: float | None = None
    eval_accuracy: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RunEvidence:
    """What the gates judge: the run's train losses in step order, its evals, its audit record."""

    run_id: str
    losses: list[tuple[int, float | None]] = field(default_factory=list)
    evals: list[EvalPoint] = field(default_factory=list)
    initial_loss: float | None = None  # from run ended, when the run has ended; else the first logged loss
    final_loss: float | None = None
    audit: dict[str, Any] | None = None

    def logged_losses(self) -> list[tuple[int, float]]:
        return [(step, loss) for step, loss in self.losses if loss is not None]

    def first_loss(self) -> float | None:
        if self.initial_loss is not None:
            return self.initial_loss
        logged = self.logged_losses()
        return logged[0][1] if logged else None

    def last_loss(self) -> float | None:
        if self.final_loss is not None:
            return self.final_loss
        logged = self.logged_losses()
        return logged[-1][1] if logged else None

    def final_metrics(self) -> dict[str, float]:
        """The run's latest value of every metric: train and eval loss, perplexity, accuracy, task metrics."""
        metrics: dict[str, float] = {}
        if (loss := self.last_loss()) is not None:
            metrics["train_loss"] = loss
        for point in self.evals:
            if point.eval_loss is not None:
                metrics["eval_loss"] = point.eval_loss
                metrics["perplexity"] = _exp(point.eval_loss)
            if point.eval_accuracy is not None:
                metrics["eval_accuracy"] = point.eval_accuracy
            for key, value in point.metrics.items():
                metrics[key.removeprefix("eval_")] = value
        return metrics


@dataclass(frozen=True)
class GateResult:
    gate: str
    name: str
    on_fail: Literal["block", "warn"]
    status: Status
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.status == "failed"


@dataclass(frozen=True)
class GateReport:
    run_id: str
    gates: list[GateResult]
    baseline: str = ""

    @property
    def overall(self) -> Overall:
        if any(g.failed and g.on_fail == "block" for g in self.gates):
            return "blocked"
        return "warnings" if any(g.failed for g in self.gates) else "passed"

    def gate(self, gate_id: str) -> GateResult:
        return next(g for g in self.gates if g.gate == gate_id)

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "overall": self.overall, "baseline": self.baseline,
                "gates": [asdict(g) for g in self.gates]}


def _exp(value: float) -> float:
    try:
        return math.exp(value)
    except OverflowError:
        return math.inf


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _short(value: float | None) -> str:
    """A loss in a message: 4 significant digits (the details keep the full value)."""
    return "none" if value is None else format(value, ".4g")


def g1_stability(evidence: RunEvidence) -> GateResult:
    def result(status: Status, message: str, **details: Any) -> GateResult:
        return GateResult("G1", "stability", "block", status, message, details)

    logged = evidence.logged_losses()
    bad = [(step, loss) for step, loss in logged if not math.isfinite(loss)]
    final = evidence.last_loss()
    if bad:
        return result("failed", f"train loss not finite at {len(bad)} step(s), first at step {bad[0][0]} "
                                f"({bad[0][1]})", non_finite_steps=len(bad), first_step=bad[0][0])
    if final is None:
        return result("no_data", "no train loss logged")
    if not math.isfinite(final):
        return result("failed", f"final train loss is {final}", final_loss=final)
    return result("passed", f"train loss finite at all {len(logged)} logged steps", final_loss=final)


def g2_convergence(evidence: RunEvidence) -> GateResult:
    def result(status: Status, message: str, **details: Any) -> GateResult:
        return GateResult("G2", "convergence", "warn", status, message, details)

    initial, final = evidence.first_loss(), evidence.last_loss()
    if initial is None or final is None:
        return result("no_data", "no train loss logged")
    details = {"initial_loss": initial, "final_loss": final}
    if not (_finite(initial) and _finite(final)):
        return result("failed", f"loss not finite (initial {_short(initial)}, final {_short(final)})", **details)
    # the relative change only when it is defined: an initial loss of 0 compares absolutely
    change = f" ({(final - initial) / abs(initial):+.1%})" if initial != 0 else ""
    if final < initial:
        return result("passed", f"loss fell from {initial:.4g} to {final:.4g}{change}", **details)
    return result("failed", f"loss did not fall: initial {initial:.4g}, final {final:.4g}{change}", **details)


def g3_generalisation(evidence: RunEvidence, policy: GatePolicy) -> GateResult:
    def result(status: Status, message: str, **details: Any) -> GateResult:
        return GateResult("G3", "generalisation", "warn", status, message,
                          {"threshold": policy.generalisation_ratio, **details})

    last_eval = next((e for e in reversed(evidence.evals) if e.eval_loss is not None), None)
    if last_eval is None:
        return result("no_data", "no eval loss logged")
    train = next((loss for step, loss in reversed(evidence.logged_losses()) if step <= last_eval.step), None)
    if train is None:
        return result("no_data", f"no train loss logged at or before the last eval (step {last_eval.step})")
    eval_loss = last_eval.eval_loss
    details = {"step": last_eval.step, "eval_loss": eval_loss, "train_loss": train}
    if not (_finite(eval_loss) and _finite(train)):
        return result("failed", f"loss not finite at step {last_eval.step} (eval {_short(eval_loss)}, train {_short(train)})",
                      **details)
    if train <= 0:  # no ratio to take: any positive eval loss is infinitely worse than a zero train loss
        ratio = math.inf if eval_loss > 0 else 1.0
    else:
        ratio = eval_loss / train
    details["ratio"] = ratio
    text = f"eval/train loss ratio {ratio:.3g} at step {last_eval.step}"
    if ratio < policy.generalisation_ratio:
        return result("passed", f"{text} < {policy.generalisation_ratio}", **details)
    return result("failed", f"{text} ≥ {policy.generalisation_ratio}", **details)


def metric_direction(metric: str) -> tuple[str, bool]:
    """(name, higher_is_better) of `name`, `name:higher` or `name:lower`; an unknown bare name is an error."""
    name, _, direction = metric.partition(":")
    if direction:
        if direction not in ("higher", "lower"):
            raise ValueError(f"metric {metric!r}: direction must be 'higher' or 'lower', got {direction!r}")
        return name, direction == "higher"
    if name in LOWER_IS_BETTER or name in HIGHER_IS_BETTER:
        return name, name in HIGHER_IS_BETTER
    raise ValueError(f"metric {name!r}: unknown direction; write {name}:higher or {name}:lower "
                     f"(known: {', '.join(sorted(LOWER_IS_BETTER | HIGHER_IS_BETTER))})")


def g4_baseline(metrics: dict[str, float], baseline: dict[str, float] | None, policy: GatePolicy,
                metric: str | None = None) -> GateResult:
    def result(status: Status, message: str, **details: Any) -> GateResult:
        return GateResult("G4", "baseline", "block", status, message, details)

    if baseline is None:
        return result("no_baseline", "no baseline: compared with nothing (informational pass)")
    if metric is None:
        metric = next((m for m in DEFAULT_BASELINE_METRICS if m in metrics and m in baseline), None)
        if metric is None:
            return result("no_data", f"no metric both the run and the baseline have among "
                                     f"{', '.join(DEFAULT_BASELINE_METRICS)}")
    name, higher = metric_direction(metric)
    if name not in metrics or name not in baseline:
        where = "the run" if name not in metrics else "the baseline"
        return result("no_data", f"{name} not in {where}", metric=name)
    value, reference = metrics[name], baseline[name]
    if not _finite(reference):
        return result("no_data", f"the baseline's {name} is {reference}: nothing to compare with", metric=name)
    factor = 1 - policy.baseline_tolerance
    bound = reference * factor if higher else reference / factor
    details = {"metric": name, "higher_is_better": higher, "value": value, "baseline": reference, "bound": bound}
    ok = _finite(value) and (value >= bound if higher else value <= bound)
    relation = "≥" if higher else "≤"
    message = (f"{name} {value:.4g} vs baseline {reference:.4g}: needs {relation} {bound:.4g} "
               f"({'higher' if higher else 'lower'} is better, {policy.baseline_tolerance:.0%} tolerance)")
    return result("passed" if ok else "failed", message, **details)


def task_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The G5 task metrics a run logged, under their canonical names, fractions normalised from percentages."""
    found = {}
    for name, keys in TASK_METRIC_KEYS.items():
        key = next((k for k in keys if k in metrics), None)
        if key is not None:
            value = metrics[key]
            found[name] = value / 100 if name in FRACTION_METRICS and _finite(value) and value > 1 else value
    return found


def g5_task_quality(metrics: dict[str, float], baseline: dict[str, float] | None, policy: GatePolicy) -> GateResult:
    tasks = task_metrics(metrics)
    if not tasks:
        return GateResult("G5", "task quality", "warn", "no_data",
                          f"no task metric logged (eval metrics keys: {', '.join(TASK_METRIC_KEYS)})")
    checks, failures = {}, []
    for name, value in tasks.items():
        if name == "mmlu":
            reference = task_metrics(baseline or {}).get("mmlu")
            if reference is None:
                checks[name] = {"value": value, "status": "no_baseline"}
                continue
            ok, rule = _finite(value) and value > reference, f"> baseline {reference:.4g}"
        else:
            minimum = policy.task_minimums[name]
            ok, rule = _finite(value) and value > minimum, f"> {minimum:g}"
        checks[name] = {"value": value, "rule": rule, "status": "passed" if ok else "failed"}
        if not ok:
            failures.append(f"{name} {value:.4g} (needs {rule})")
    if failures:
        return GateResult("G5", "task quality", "warn", "failed", "below threshold: " + "; ".join(failures), checks)
    return GateResult("G5", "task quality", "warn", "passed",
                      f"{', '.join(tasks)} meet their thresholds", checks)


def g6_audit_completeness(audit: dict[str, Any] | None) -> GateResult:
    if audit is None:
        return GateResult("G6", "audit completeness", "block", "failed", "no audit record: the run is not stored")
    missing = missing_from_audit(audit)
    if missing:
        return GateResult("G6", "audit completeness", "block", "failed", "missing: " + ", ".join(missing),
                          {"missing": missing})
    return GateResult("G6", "audit completeness", "block", "passed",
                      "inputs, outputs and reproducibility recorded; every hash computed; config versioned")


def evaluate(evidence: RunEvidence, baseline: dict[str, float] | None = None, *, baseline_name: str = "",
             metric: str | None = None, policy: GatePolicy | None = None) -> GateReport:
    """Every gate over one run. `baseline`: the baseline's final metrics (another run's, or a file's)."""
    policy = policy or GatePolicy()
    metrics = evidence.final_metrics()
    return GateReport(evidence.run_id, [
        g1_stability(evidence),
        g2_convergence(evidence),
        g3_generalisation(evidence, policy),
        g4_baseline(metrics, baseline, policy, metric),
        g5_task_quality(metrics, baseline, policy),
        g6_audit_completeness(evidence.audit),
    ], baseline_name)
