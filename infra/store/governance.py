"""Read queries over the governance tables (migration 004) and the run data the gates judge.

A mixin of `StoreReader`, so the dashboard and `trainwire up`'s read API serve them like every other read.
The rules themselves (gates, audit record, registry) live in `trainwire.consumers.governance`.
"""

from __future__ import annotations

import json
from typing import Any

Row = dict[str, Any]

_TRANSITIONS = """
SELECT seq, ts, actor, action, run_id, details, prev_hash, entry_hash, key_id, signature
FROM audit_log WHERE action = 'registry.transition' AND ({run_id:String} = '' OR run_id = {run_id:String})
ORDER BY seq
"""


def _parsed(row: Row) -> Row:
    """A gate_results row with its JSON columns as objects."""
    out = {k: v for k, v in row.items() if not k.endswith("_json")}
    for key in ("gates_json", "inputs_json", "audit_json"):
        if key in row:
            out[key.removesuffix("_json")] = json.loads(row[key]) if row[key] else None
    return out


class GovernanceReads:
    client: Any  # provided by StoreReader

    def _rows(self, sql: str, **parameters: Any) -> list[Row]:  # provided by StoreReader
        raise NotImplementedError

    def run_ended(self, run_id: str) -> Row | None:
        rows = self._rows("SELECT * FROM run_ended FINAL WHERE run_id = {run_id:String} ORDER BY seq DESC LIMIT 1",
                          run_id=run_id)
        return rows[0] if rows else None

    def eval_metrics(self, run_id: str) -> list[Row]:
        """Evals with their task metrics map, in step order."""
        return self._rows(
            "SELECT step, ts, eval_loss, eval_accuracy, perplexity, metrics FROM evals FINAL "
            "WHERE run_id = {run_id:String} ORDER BY step, seq",
            run_id=run_id,
        )

    def gate_results(self, run_id: str) -> list[Row]:
        """Every gate evaluation of a run, newest first, with its verdicts and inputs (not the audit record)."""
        return [_parsed(r) for r in self._rows(
            "SELECT evaluation_id, run_id, evaluated_at, trigger, actor, baseline, overall, gates_json, inputs_json, "
            "result_sha256 FROM gate_results FINAL WHERE run_id = {run_id:String} ORDER BY evaluated_at DESC",
            run_id=run_id,
        )]

    def latest_gates(self, run_id: str) -> Row | None:
        rows = self.gate_results(run_id)
        return rows[0] if rows else None

    def stored_audit_record(self, run_id: str) -> Row | None:
        """The audit record as of the run's latest gate evaluation (what G6 judged), or None."""
        rows = self._rows(
            "SELECT audit_json FROM gate_results FINAL WHERE run_id = {run_id:String} "
            "ORDER BY evaluated_at DESC LIMIT 1", run_id=run_id)
        return json.loads(rows[0]["audit_json"]) if rows and rows[0]["audit_json"] else None

    def evaluated_at_run_end(self, run_id: str) -> bool:
        return bool(self._rows("SELECT count() AS n FROM gate_results WHERE run_id = {run_id:String} "
                               "AND trigger = 'run_end'", run_id=run_id)[0]["n"])

    def runs_awaiting_gates(self) -> list[str]:
        """Ended runs without a run-end gate evaluation (their consumer stopped before it, or it failed)."""
        return [r["run_id"] for r in self._rows(
            "SELECT DISTINCT run_id FROM run_ended WHERE run_id NOT IN "
            "(SELECT run_id FROM gate_results WHERE trigger = 'run_end') ORDER BY run_id")]

    def registry_history(self, run_id: str) -> list[Row]:
        """A run's registry transitions that the audit log vouches for, oldest first: from, to, actor, time,
        reason. A transition entry that is altered or not signed by a trusted key is left out: it never sets a
        stage (`unvouched_transitions` names them; `trainwire audit verify` fails on them)."""
        return self._transitions(run_id)[0]

    def unvouched_transitions(self, run_id: str) -> list[Row]:
        """A run's registry transition entries that set no stage, each with why (`problem`)."""
        return self._transitions(run_id)[1]

    def registry_stages(self) -> list[Row]:
        """Every run that has left stage None: its current stage and the transition that set it."""
        latest = {t["run_id"]: t for t in self._transitions("")[0]}  # in sequence order: the last one wins
        stages = [{"run_id": run_id, "stage": t["to_stage"], "since": t["ts"], "actor": t["actor"]}
                  for run_id, t in latest.items()]
        return sorted(stages, key=lambda row: row["since"], reverse=True)

    def _transitions(self, run_id: str) -> tuple[list[Row], list[Row]]:
        from .audit_chain import Entry, unvouched_reason
        from .audit_config import config_for

        rows = self._rows(_TRANSITIONS, run_id=run_id)
        if not rows:
            return [], []
        trusted = config_for(self.client).trusted_keys()
        first_signed = self._rows("SELECT minOrNull(seq) AS seq FROM audit_log WHERE signature != ''")[0]["seq"]
        vouched, unvouched = [], []
        for row in rows:
            details = json.loads(row["details"] or "{}")
            transition = {"seq": row["seq"], "ts": row["ts"], "actor": row["actor"], "run_id": row["run_id"],
                          "from_stage": details.get("from", ""), "to_stage": details.get("to", ""),
                          "reason": details.get("reason", "")}
            problem = unvouched_reason(Entry(**row), trusted, first_signed)
            (vouched if problem is None else unvouched).append(transition | ({"problem": problem} if problem else {}))
        return vouched, unvouched

    def audit_head(self) -> Row | None:
        """The audit log's last entry, which the next one links to."""
        rows = self._rows("SELECT seq, ts, actor, action, run_id, details, prev_hash, entry_hash, key_id, signature "
                          "FROM audit_log ORDER BY seq DESC LIMIT 1")
        return rows[0] if rows else None

    def stored_gate_results(self) -> list[Row]:
        """Every gate evaluation as stored, JSON unparsed: what `trainwire audit verify` checks against the log."""
        return self._rows("SELECT * FROM gate_results FINAL ORDER BY evaluated_at")

    def audit_log(self, run_id: str | None = None) -> list[Row]:
        """Who accessed or changed what, oldest first; one run's entries, or all."""
        return self._rows(
            "SELECT seq, ts, actor, action, run_id, details, prev_hash, entry_hash, key_id, signature "
            "FROM audit_log "
            "WHERE {run_id:String} = '' OR run_id = {run_id:String} ORDER BY seq",
            run_id=run_id or "",
        )
