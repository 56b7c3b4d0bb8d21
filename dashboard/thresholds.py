"""The detector thresholds the charts draw, as this deployment configured them (`[detectors]` of TRAINWIRE_CONFIG,
with an experiment's overrides): a line at a default the deployment changed would show a limit no alert uses."""

from __future__ import annotations

from trainwire.dashboard.charts import Threshold
from trainwire.dashboard.shared import settings


def gpu_thresholds(experiment: str | None) -> dict[str, Threshold]:
    """Per GPU sample field, the threshold of the rule judging it; an experiment's own when given, the deployment's
    otherwise (a host's GPUs serve many experiments). A switched-off rule draws no line."""
    detectors = settings().detectors
    rules = detectors.for_experiment(experiment) if experiment else detectors.deployment
    shown = {}
    if rules.gpu_temperature_high.enabled:
        shown["temperature_c"] = Threshold(rules.gpu_temperature_high.celsius,
                                           f"gpu_temperature_high ≥ {rules.gpu_temperature_high.celsius:g} °C")
    if rules.gpu_utilization_low.enabled:
        low = rules.gpu_utilization_low.min_utilization_pct
        shown["utilization_pct"] = Threshold(low, f"gpu_utilization_low < {low:g} %")
    return shown
