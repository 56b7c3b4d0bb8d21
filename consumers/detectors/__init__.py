"""Streaming detectors (spec §4): per-run state, one alert per incident, resolved when the condition clears."""

from .engine import DetectorEngine
from .rules import GradNormHigh, LossNotFinite, LossSpike, Rule, default_rules

__all__ = ["DetectorEngine", "GradNormHigh", "LossNotFinite", "LossSpike", "Rule", "default_rules"]
