"""Runs every rule over each run's events in order and turns changes of condition into alerts."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from trainwire.schemas import Alert

from .rules import Rule, default_rules

# Alert ids derive from the incident, so an event replayed after a crash re-creates the same alert row.
_ALERT_NAMESPACE = uuid.UUID("6f1c0b1e-7d0a-4d53-9a55-2f3b8b7e2a10")


@dataclass
class _RunState:
    rule_state: dict[str, Any] = field(default_factory=dict)
    firing: dict[str, str] = field(default_factory=dict)  # rule id → dedup key of the open incident


class DetectorEngine:
    def __init__(self, rules: list[Rule] | None = None):
        self.rules = rules if rules is not None else default_rules()
        self._runs: dict[str, _RunState] = {}

    def observe(self, kind: str, record: dict) -> list[Alert]:
        if kind == "run_ended":
            self._runs.pop(record["run_id"], None)
            return []
        state = self._runs.setdefault(record["run_id"], _RunState())
        alerts = []
        for rule in self.rules:
            if kind not in rule.kinds:
                continue
            if rule.rule_id not in state.rule_state:
                state.rule_state[rule.rule_id] = rule.new_state()
            finding = rule.check(record, state.rule_state[rule.rule_id])
            if finding is None:
                continue
            open_key = state.firing.get(rule.rule_id)
            if finding.active and open_key is None:
                key = f"{record['run_id']}/{rule.rule_id}/{record.get('step', record['seq'])}"
                state.firing[rule.rule_id] = key
                alerts.append(self._alert(rule, record, finding, key, "firing"))
            elif not finding.active and open_key is not None:
                del state.firing[rule.rule_id]
                alerts.append(self._alert(rule, record, finding, open_key, "resolved"))
        return alerts

    @staticmethod
    def _alert(rule: Rule, record: dict, finding, key: str, state: str) -> Alert:
        return Alert(
            event_id=str(uuid.uuid5(_ALERT_NAMESPACE, f"{key}/{state}")),
            run_id=record["run_id"], experiment=record["experiment"], team=record.get("team", ""),
            ts_ms=record["ts_ms"], rule=rule.rule_id, severity=rule.severity, state=state,
            step=record.get("step"), value=finding.value if finding.active else record.get(rule.field),
            threshold=finding.threshold,
            message=finding.message or f"{rule.rule_id} cleared", dedup_key=key,
        )
