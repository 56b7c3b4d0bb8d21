"""Streaming detectors (spec §4): per-run state, one alert per incident, resolved when the condition clears."""

from .base import Finding, Rule, RunFacts
from .catalog import RULES, default_rules, rules_from
from .engine import DetectorEngine
from .history import HistoryRequest, HistoryUnavailableError, RunHistory, StoreHistory
from .rules import GradNormHigh, LossNotFinite, LossSpike

__all__ = ["RULES", "DetectorEngine", "Finding", "GradNormHigh", "HistoryRequest", "HistoryUnavailableError",
           "LossNotFinite", "LossSpike", "Rule", "RunFacts", "RunHistory", "StoreHistory", "default_rules",
           "rules_from"]
