"""Every rule of spec §4, built from its `[detectors.<rule_id>]` settings."""

from __future__ import annotations

from trainwire.infra.detector_settings import DetectorParameters

from .base import Rule
from .eval_rules import EvalAccuracyLow, GeneralizationGap, Overfitting, PerplexityHigh
from .gpu_rules import GpuMemoryHigh, GpuTemperatureHigh, GpuUtilizationLow
from .rules import GradNormHigh, LossNotFinite, LossSpike, LossUnstable, ThroughputLow, Underfitting
from .stall import RunStalled

RULES: tuple[type[Rule], ...] = (
    LossNotFinite, LossSpike, GradNormHigh, Overfitting, GeneralizationGap, PerplexityHigh, EvalAccuracyLow,
    ThroughputLow, Underfitting, LossUnstable, GpuMemoryHigh, GpuTemperatureHigh, GpuUtilizationLow, RunStalled,
)


def rules_from(parameters: DetectorParameters) -> list[Rule]:
    """The enabled rules with their parameters."""
    built = []
    for rule in RULES:
        settings = getattr(parameters, rule.rule_id)
        if settings.enabled:
            built.append(rule.from_settings(settings))
    return built


def default_rules() -> list[Rule]:
    return rules_from(DetectorParameters())
