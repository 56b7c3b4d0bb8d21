"""Detector thresholds (spec §4): defaults here, per deployment in `[detectors.<rule>]`, per experiment in
`[detectors.experiments."<experiment>".<rule>]` of the TRAINWIRE_CONFIG file. docs/detectors.md lists every key.

Values are strict (a string is not a number, a float is not a window size) and unknown rules or parameters are
refused, so a typo fails at start-up with its key instead of silently leaving a default in force.
"""

from __future__ import annotations

import copy
from functools import cached_property

from pydantic import BaseModel, ConfigDict, Field, create_model


def _fire_after(default: int) -> int:
    return Field(default=default, ge=1, le=100_000, description="the condition must hold for this many of the "
                 "rule's readings in a row before the incident fires")


def _clear_after(default: int) -> int:
    return Field(default=default, ge=1, le=100_000, description="…and must be clear for this many in a row "
                 "before it resolves (noise around a threshold is one incident, not many)")


class RuleSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    enabled: bool = Field(default=True, description="false switches the rule off")


class EventRuleSettings(RuleSettings):
    """A rule judged on events: hysteresis keys besides its thresholds (run_stalled is judged on a clock)."""

    fire_after: int = _fire_after(1)
    fire_after_seconds: float = Field(default=0.0, ge=0, le=7 * 24 * 3600, description="…and for at least this "
                                      "long (by the events' timestamps)")
    clear_after: int = _clear_after(1)


class LossSpikeSettings(EventRuleSettings):
    factor: float = Field(default=1.5, gt=1, description="fires when loss > factor × median of recent losses")
    min_increase: float = Field(default=0.1, ge=0, description="…and by at least this much (in loss units): at the "
                                "small losses a fine-tune ends with, noise is a large relative jump")
    window: int = Field(default=10, ge=1, description="recent finite losses the median is taken over")
    min_history: int = Field(default=3, ge=1, description="losses needed before the rule judges")
    clear_after: int = _clear_after(5)


class GradNormHighSettings(EventRuleSettings):
    max_grad_norm: float = Field(default=10.0, gt=0, description="fires when grad norm > this (or not finite)")
    clear_after: int = _clear_after(3)


class OverfittingSettings(EventRuleSettings):
    ratio: float = Field(default=1.5, gt=0, description="fires when eval loss > ratio × current train loss "
                       "(mean of the last 5 logged)")
    rising_evals: int = Field(default=3, ge=1, description="or when eval loss rose this many evals in a row "
                              "while train loss fell")
    min_rise: float = Field(default=0.02, ge=0, description="…by at least this much in all (relative to where the "
                            "rise began): a plateau's jitter is not a trend")
    min_gap: float = Field(default=0.1, ge=0, description="the ratio test also needs eval loss − train loss ≥ this "
                           "(loss units): tiny losses make large ratios of nothing")
    fire_after: int = _fire_after(2)
    clear_after: int = _clear_after(2)


class GeneralizationGapSettings(EventRuleSettings):
    ratio: float = Field(default=1.2, gt=0, description="fires when eval loss / train loss ≥ ratio")
    min_gap: float = Field(default=0.1, ge=0, description="…and eval loss − train loss ≥ this (loss units)")
    clear_after: int = _clear_after(2)


class PerplexityHighSettings(EventRuleSettings):
    max_perplexity: float = Field(default=100.0, gt=1, description="fires when exp(eval loss) > this")


class EvalAccuracyLowSettings(EventRuleSettings):
    baseline: float | None = Field(default=None, ge=0, description="fires when eval accuracy < baseline; "
                                   "no baseline, no alert")


class ThroughputLowSettings(EventRuleSettings):
    min_tokens_per_s: float = Field(default=100.0, gt=0, description="fires when most recent readings are below")
    window: int = Field(default=5, ge=1, description="steps: more than half of the last `window` must be low")
    clear_after: int = _clear_after(5)


class UnderfittingSettings(EventRuleSettings):
    window: int = Field(default=50, ge=4, description="logged losses compared: newer half against older half")
    min_decrease: float = Field(default=0.01, ge=0, lt=1, description="relative decrease expected over a window")
    min_progress: float = Field(default=0.1, ge=0, lt=1, description="a run whose loss fell this much from its "
                                "start is converging, not underfitting")
    fire_after: int = _fire_after(25)
    clear_after: int = _clear_after(10)


class LossUnstableSettings(EventRuleSettings):
    window: int = Field(default=20, ge=4, description="recent finite losses examined")
    min_flip_fraction: float = Field(default=0.6, gt=0, le=1, description="share of consecutive changes that "
                                     "reverse direction")
    min_relative_swing: float = Field(default=0.25, gt=0, description="mean |change| between logged losses, "
                                      "relative to the window's mean loss")
    min_swing: float = Field(default=0.05, ge=0, description="…and at least this much in loss units")
    fire_after: int = _fire_after(5)
    clear_after: int = _clear_after(10)


class GpuMemoryHighSettings(EventRuleSettings):
    used_fraction: float = Field(default=0.95, gt=0, le=1, description="fires when used / total ≥ this")
    clear_after: int = _clear_after(3)


class GpuTemperatureHighSettings(EventRuleSettings):
    celsius: float = Field(default=85.0, gt=0, description="fires at or above this temperature")
    clear_after: int = _clear_after(3)


class GpuUtilizationLowSettings(EventRuleSettings):
    min_utilization_pct: float = Field(default=70.0, gt=0, le=100, description="fires when most recent samples "
                                       "of a GPU are below, once the run has logged a step")
    window: int = Field(default=6, ge=1, description="samples per GPU: more than half of the last `window` "
                        "must be low")
    clear_after: int = _clear_after(3)


class RunStalledSettings(RuleSettings):
    factor: float = Field(default=3.0, gt=1, description="fires after factor × the expected interval of silence")
    window: int = Field(default=20, ge=1, description="recent gaps between the run's events; the largest is "
                        "the expected interval")
    min_interval_s: float = Field(default=5.0, gt=0, description="floor of the expected interval (the "
                                  "heartbeat period)")


class DetectorParameters(BaseModel):
    """Every rule's parameters, one field per rule id."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    loss_not_finite: EventRuleSettings = EventRuleSettings()
    loss_spike: LossSpikeSettings = LossSpikeSettings()
    grad_norm_high: GradNormHighSettings = GradNormHighSettings()
    overfitting: OverfittingSettings = OverfittingSettings()
    generalization_gap: GeneralizationGapSettings = GeneralizationGapSettings()
    perplexity_high: PerplexityHighSettings = PerplexityHighSettings()
    eval_accuracy_low: EvalAccuracyLowSettings = EvalAccuracyLowSettings()
    throughput_low: ThroughputLowSettings = ThroughputLowSettings()
    underfitting: UnderfittingSettings = UnderfittingSettings()
    loss_unstable: LossUnstableSettings = LossUnstableSettings()
    gpu_memory_high: GpuMemoryHighSettings = GpuMemoryHighSettings()
    gpu_temperature_high: GpuTemperatureHighSettings = GpuTemperatureHighSettings()
    gpu_utilization_low: GpuUtilizationLowSettings = GpuUtilizationLowSettings()
    run_stalled: RunStalledSettings = RunStalledSettings()


def _partial(model: type[BaseModel]) -> type[BaseModel]:
    """`model` with every field optional and unset by default: an override names only what it changes."""
    fields = {}
    for name, info in model.model_fields.items():
        optional = copy.copy(info)  # keeps the field's constraints
        optional.default = None
        fields[name] = (info.annotation | None, optional)
    return create_model(f"{model.__name__}Override", __config__=model.model_config, **fields)


RuleOverrides = create_model(
    "RuleOverrides", __config__=DetectorParameters.model_config,
    **{rule: (_partial(info.annotation) | None, None) for rule, info in DetectorParameters.model_fields.items()},
)


class DetectorSettings(DetectorParameters):
    experiments: dict[str, RuleOverrides] = Field(default_factory=dict)  # type: ignore[valid-type]

    def __hash__(self) -> int:  # Settings are hashable (producers key their emitters by them); dicts are not
        return hash(self.model_dump_json())

    @cached_property
    def deployment(self) -> DetectorParameters:
        """The parameters every experiment without overrides runs with."""
        return DetectorParameters.model_validate(self.model_dump(exclude={"experiments"}))

    def for_experiment(self, experiment: str) -> DetectorParameters:
        """The deployment's parameters with the experiment's overrides, parameter by parameter."""
        overrides = self.experiments.get(experiment)
        if overrides is None:
            return self.deployment
        merged = self.deployment.model_dump()
        for rule, changes in overrides.model_dump(exclude_none=True).items():
            merged[rule].update(changes)
        return DetectorParameters.model_validate(merged)
