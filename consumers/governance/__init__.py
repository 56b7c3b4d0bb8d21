"""Governance (spec §5–§7): quality gates, the audit record, the model registry and the tamper-evident audit log."""

from .gates import EXIT_CODES, EvalPoint, GatePolicy, GateReport, GateResult, RunEvidence, evaluate
from .registry import Roles, RegistryError
from .service import Governance, baseline_from_file, roles_for

__all__ = ["EXIT_CODES", "EvalPoint", "GatePolicy", "GateReport", "GateResult", "Governance", "RegistryError",
           "Roles", "RunEvidence", "baseline_from_file", "evaluate", "roles_for"]
