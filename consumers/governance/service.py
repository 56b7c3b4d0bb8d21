"""Gates, audit record and registry over the store: evaluate and record, transition, verify, log every access.

Every operation takes the actor doing it and appends an entry to the audit log (the hash chain), reads
included: the log says who accessed or changed what. Operations return JSON-ready dicts, so `trainwire up`
serves them unchanged as POST actions (`actions()`) for CLI calls made while it owns the embedded store.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from clickhouse_connect.driver.client import Client

from trainwire.infra.config import Settings
from trainwire.infra.store.api import to_json
from trainwire.infra.store.read import StoreReader

from trainwire.infra.store.audit_anchor import latest_anchor, published_head
from trainwire.infra.store.audit_bundle import build_bundle
from trainwire.infra.store.audit_chain import (Entry, Verification, append_entry, append_lock, canonical_json,
                                              iso_utc, read_entries, sha256_of, verify_log)
from trainwire.infra.store.audit_config import config_for, store_identity

from .audit import build_audit_record
from .gates import EXIT_CODES, EvalPoint, GatePolicy, GateReport, RunEvidence, evaluate, g6_audit_completeness
from .registry import (SYSTEM_ACTOR, ApprovalEvidence, RegistryError, Roles, Transition, check_transition,
                       current_stage, normalise_actor)

GATE_COLUMNS = ["evaluation_id", "run_id", "evaluated_at", "trigger", "actor", "baseline", "overall", "gates_json",
                "inputs_json", "audit_json", "result_sha256"]


def roles_for(settings: Settings) -> Roles:
    """`TRAINWIRE_ROLES` (which must exist), else `$TRAINWIRE_HOME/roles.toml` if present, else open roles."""
    if settings.roles is not None and not settings.roles.is_file():
        raise ValueError(f"TRAINWIRE_ROLES: no such file {str(settings.roles)!r}")
    return Roles.load(settings.roles or settings.home / "roles.toml")


def baseline_from_file(path: Path) -> dict[str, float]:
    """A JSON object of metric → number, or an exported audit record (its final metrics)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"--baseline {path}: {err}") from None
    if isinstance(data, dict) and isinstance(data.get("output_artifacts"), dict):
        data = data["output_artifacts"].get("final_metrics") or {}
    if not isinstance(data, dict):
        raise ValueError(f"--baseline {path}: expected a JSON object of metric → number")
    bad = [k for k, v in data.items() if isinstance(v, bool) or not isinstance(v, (int, float))]
    if bad:
        raise ValueError(f"--baseline {path}: {', '.join(bad)} must be a number")
    return {k: float(v) for k, v in data.items()}


def _result_sha256(row: dict[str, Any]) -> str:
    """The hash of a stored evaluation, its time included (to the millisecond, as stored)."""
    return sha256_of([iso_utc(row[c]) if c == "evaluated_at" else row[c] for c in GATE_COLUMNS[:-1]])


class Governance:
    def __init__(self, client: Client, roles: Roles | None = None, policy: GatePolicy | None = None):
        self._client = client
        self.reader = StoreReader(client)
        self.roles = roles or Roles()
        self.policy = policy or GatePolicy()

    # ---- the audit log -------------------------------------------------------------------------------------

    def _entries(self) -> list[Entry]:
        return read_entries(self._client)

    def _anchored_heads(self) -> dict[str, dict[str, Any] | None]:
        """The latest head anchored outside the store: in the anchor file, and on Kafka when configured."""
        config, store = config_for(self._client), store_identity(self._client)
        heads = {f"anchor file {config.anchor_path}": latest_anchor(config.anchor_path, store)}
        if config.settings is not None and config.settings.kafka:
            heads[f"Kafka topic {config.settings.topic('audit-head')}"] = published_head(config.settings, store)
        return heads

    def _append(self, actor: str, action: str, run_id: str, details: dict[str, Any]) -> Entry:
        return append_entry(self._client, actor, action, run_id, to_json(details))

    def _check_trail(self, head: str | None = None) -> Verification:
        """The chain, and every stored gate evaluation against the log entry that vouches for it."""
        entries = self._entries()
        verification = verify_log(entries, config_for(self._client).trusted_keys(), self._anchored_heads(), head)
        problems = list(verification.problems)
        vouched = {}
        for entry in entries:
            if entry.action == "gates.evaluated":
                details = _details(entry)
                vouched[details.get("evaluation_id")] = details.get("result_sha256")
        stored = set()
        for row in self.reader.stored_gate_results():
            stored.add(row["evaluation_id"])
            if row["evaluation_id"] not in vouched:
                problems.append(f"gate evaluation {row['evaluation_id']} of run {row['run_id']}: no audit log entry")
            elif row["result_sha256"] != vouched[row["evaluation_id"]] or _result_sha256(row) != row["result_sha256"]:
                problems.append(f"gate evaluation {row['evaluation_id']} of run {row['run_id']}: altered")
        problems += [f"gate evaluation {evaluation_id}: deleted" for evaluation_id in vouched.keys() - stored]
        return Verification(verification.entries, problems, verification.head, verification.anchors)

    def verify(self, actor: str, head: str | None = None) -> dict[str, Any]:
        verification = self._check_trail(head)
        self._append(actor, "audit.verified", "", {"ok": verification.ok, "entries": verification.entries,
                                                   "problems": len(verification.problems)})
        return {"ok": verification.ok, "entries": verification.entries, "head": verification.head,
                "anchors": verification.anchors, "problems": verification.problems}

    def audit_trail(self, actor: str, run_id: str | None = None) -> list[dict[str, Any]]:
        entries = [entry.to_dict() for entry in read_entries(self._client, run_id)]
        self._append(actor, "audit.log_viewed", run_id or "", {})
        return entries

    # ---- gates ---------------------------------------------------------------------------------------------

    def _started(self, run_id: str) -> dict[str, Any]:
        started = self.reader.run_started(run_id)
        if started is None:
            raise ValueError(f"no run {run_id} in the store")
        return started

    def evidence(self, run_id: str) -> tuple[RunEvidence, dict[str, Any]]:
        """The run's evidence for the gates (its audit record without gate status) and its run started row."""
        started = self._started(run_id)
        ended = self.reader.run_ended(run_id)
        evals = [EvalPoint(e["step"], e["eval_loss"], e["eval_accuracy"], dict(e["metrics"] or {}))
                 for e in self.reader.eval_metrics(run_id)]
        evidence = RunEvidence(
            run_id, [(s["step"], s["loss"]) for s in self.reader.steps(run_id)], evals,
            initial_loss=ended["initial_loss"] if ended else None, final_loss=ended["final_loss"] if ended else None)
        record = build_audit_record(started, ended, self.reader.checkpoints(run_id), evidence.final_metrics())
        return RunEvidence(**{**evidence.__dict__, "audit": to_json(record)}), started

    def evaluate_gates(self, run_id: str, actor: str, baseline_run: str | None = None,
                       baseline_metrics: dict[str, float] | None = None, baseline_label: str = "file",
                       metric: str | None = None, trigger: str = "on_demand") -> dict[str, Any]:
        """Evaluate G1–G6, store the result with its inputs, log it; a run in stage None that passed every gate
        becomes a Candidate."""
        evidence, _ = self.evidence(run_id)
        baseline_name = ""
        if baseline_run:
            if self.reader.run_started(baseline_run) is None:
                raise ValueError(f"--baseline: no run {baseline_run} in the store")
            baseline_metrics, baseline_name = self.evidence(baseline_run)[0].final_metrics(), f"run:{baseline_run}"
        elif baseline_metrics is not None:
            baseline_name = f"file:{baseline_label}"
        report = evaluate(evidence, baseline_metrics, baseline_name=baseline_name, metric=metric, policy=self.policy)
        evaluated_at = datetime.now(timezone.utc)
        evaluated_at = evaluated_at.replace(microsecond=evaluated_at.microsecond // 1000 * 1000)
        evaluation_id = str(uuid.uuid4())
        audit = {**evidence.audit}
        audit["output_artifacts"] = {**audit["output_artifacts"],
                                     "gate_status": _gate_status(report, evaluation_id, evaluated_at)}
        inputs = {"final_metrics": evidence.final_metrics(), "initial_loss": evidence.first_loss(),
                  "final_loss": evidence.last_loss(), "steps_logged": len(evidence.losses),
                  "evals_logged": len(evidence.evals), "baseline_metrics": baseline_metrics, "metric": metric,
                  "policy": self.policy.__dict__}
        row = {"evaluation_id": evaluation_id, "run_id": run_id, "evaluated_at": evaluated_at, "trigger": trigger,
               "actor": actor, "baseline": baseline_name, "overall": report.overall,
               "gates_json": canonical_json(to_json(report.to_dict()["gates"])),
               "inputs_json": canonical_json(to_json(inputs)), "audit_json": canonical_json(to_json(audit))}
        row["result_sha256"] = _result_sha256(row)
        with append_lock:
            self._client.insert("gate_results", [[row[c] for c in GATE_COLUMNS]], column_names=GATE_COLUMNS)
            self._append(actor, "gates.evaluated", run_id, {
                "evaluation_id": evaluation_id, "overall": report.overall, "trigger": trigger,
                "baseline": baseline_name, "result_sha256": row["result_sha256"]})
            stage = current_stage(self._transitions(run_id))
            if report.overall == "passed" and stage == "None":
                stage = self._transition(run_id, "Candidate", SYSTEM_ACTOR,
                                         f"all gates passed (evaluation {evaluation_id})")["stage"]
        return {**report.to_dict(), "evaluation_id": evaluation_id, "evaluated_at": iso_utc(evaluated_at),
                "trigger": trigger, "stage": stage, "exit_code": EXIT_CODES[report.overall]}

    # ---- audit record ----------------------------------------------------------------------------------------

    def audit_record(self, run_id: str, actor: str, export: str | None = None) -> dict[str, Any]:
        """The run's audit record from its stored events now, with its latest gate evaluation's status."""
        evidence, _ = self.evidence(run_id)
        record = dict(evidence.audit)
        latest = self.reader.latest_gates(run_id)
        gate_status = None
        if latest is not None:
            gate_status = {"overall": latest["overall"], "evaluation_id": latest["evaluation_id"],
                           "evaluated_at": iso_utc(latest["evaluated_at"]),
                           "gates": {g["gate"]: g["status"] for g in latest["gates"]}}
        record["output_artifacts"] = {**record["output_artifacts"], "gate_status": gate_status}
        record["registry_stage"] = current_stage(self._transitions(run_id))
        record["generated_at"] = iso_utc(datetime.now(timezone.utc))
        # the log vouches for the record: an exported bundle is checked against this hash
        self._append(actor, "audit.exported" if export else "audit.viewed", run_id,
                     {"file": export, "record_sha256": sha256_of(to_json(record))} if export else {})
        return record

    def audit_bundle(self, run_id: str, actor: str, export: str) -> dict[str, Any]:
        """The run's audit record with the chain up to the anchored head, the anchor and the public keys: what an
        auditor verifies offline (`trainwire audit verify-bundle`)."""
        record = to_json(self.audit_record(run_id, actor, export=export))
        config = config_for(self._client)
        anchor = latest_anchor(config.anchor_path, store_identity(self._client))
        if anchor is None:
            raise RuntimeError(f"no anchored head in {config.anchor_path} for this store")
        return build_bundle(run_id, record, self._entries(), anchor, config.trusted_keys().pems(), config.signer())

    # ---- registry --------------------------------------------------------------------------------------------

    def _transitions(self, run_id: str) -> list[Transition]:
        return [Transition(run_id, t["from_stage"], t["to_stage"], t["actor"], t["reason"])
                for t in self.reader.registry_history(run_id)]

    def _approval(self, run_id: str, transitions: list[Transition]) -> ApprovalEvidence:
        requester = next((t.actor for t in reversed(transitions) if t.to_stage == "Staging"), None)
        g6 = g6_audit_completeness(self.evidence(run_id)[0].audit)
        trail = self._check_trail()
        return ApprovalEvidence(requester, g6.status == "passed", g6.message, trail.ok, trail.problems)

    def _transition(self, run_id: str, to_stage: str, actor: str, reason: str | None) -> dict[str, Any]:
        self._started(run_id)
        with contextlib.suppress(ValueError):  # an empty actor is refused below, and that refusal logged
            actor = normalise_actor(actor)
        with append_lock:
            transitions = self._transitions(run_id)
            transition = Transition(run_id, current_stage(transitions), to_stage, actor, (reason or "").strip())
            approval = self._approval(run_id, transitions) if to_stage == "Production" else None
            details = {"from": transition.from_stage, "to": to_stage, "reason": transition.reason}
            try:
                check_transition(transition, self.roles, approval)
            except RegistryError as refusal:
                self._append(actor, "registry.refused", run_id, {**details, "refusal": str(refusal)})
                raise
            entry = self._append(actor, "registry.transition", run_id, details)
        return {"run_id": run_id, "stage": to_stage, "from": transition.from_stage, "actor": actor,
                "reason": transition.reason, "at": iso_utc(entry.ts), "entry_hash": entry.entry_hash}

    def registry_request(self, run_id: str, actor: str, reason: str | None = None) -> dict[str, Any]:
        return self._transition(run_id, "Staging", actor, reason)

    def registry_approve(self, run_id: str, actor: str, reason: str | None = None) -> dict[str, Any]:
        return self._transition(run_id, "Production", actor, reason)

    def registry_archive(self, run_id: str, actor: str, reason: str | None = None) -> dict[str, Any]:
        return self._transition(run_id, "Archived", actor, reason)

    def registry_status(self, actor: str, run_id: str | None = None) -> dict[str, Any]:
        """One run's stage and history, or every run that has a stage."""
        if run_id is None:
            self._append(actor, "registry.viewed", "", {})
            return {"runs": [{**r, "since": iso_utc(r["since"])} for r in self.reader.registry_stages()]}
        self._started(run_id)
        history = self.reader.registry_history(run_id)
        latest = self.reader.latest_gates(run_id)
        self._append(actor, "registry.viewed", run_id, {})
        return {"run_id": run_id, "stage": history[-1]["to_stage"] if history else "None",
                "gates": latest["overall"] if latest else None,
                "history": [{"at": iso_utc(h["ts"]), "from": h["from_stage"], "to": h["to_stage"],
                             "actor": h["actor"], "reason": h["reason"]} for h in history],
                "unvouched": [{"seq": u["seq"], "at": iso_utc(u["ts"]), "from": u["from_stage"], "to": u["to_stage"],
                               "actor": u["actor"], "problem": u["problem"]}
                              for u in self.reader.unvouched_transitions(run_id)]}

    def act_as(self, actor: str, os_user: str | None) -> dict[str, str]:
        """The actor the OS user `os_user` may record: themself, or anyone when the roles file lists them in
        `act_for_others`. A refusal is logged (`actor.refused`, by the OS user, naming the claimed actor) first."""
        if os_user is None:
            raise ValueError("no os_user: the login of the process asking is needed to decide who acts")
        os_actor = normalise_actor(os_user)
        try:
            allowed = self.roles.may_act_for(os_user, normalise_actor(actor))
            why = f"{os_actor} is not in act_for_others of the roles file, so may act only as {os_actor}"
        except ValueError as err:
            allowed, why = False, str(err)
        if not allowed:
            self._append(os_actor, "actor.refused", "", {"claimed": actor, "refusal": why})
            raise ValueError(f"--actor {actor!r} refused: {why}")
        return {"actor": normalise_actor(actor)}

    def _acting(self, operation: Callable[..., Any]) -> Callable[..., Any]:
        def run(actor: str, os_user: str | None = None, **arguments: Any) -> Any:
            return operation(actor=self.act_as(actor, os_user)["actor"], **arguments)
        return run

    def actions(self) -> dict[str, Any]:
        """The operations `trainwire up` serves on POST /api/NAME and the CLI runs: each takes the OS user asking
        (`os_user`) and the actor, and applies `act_as` before anything else."""
        operations = {name: self._acting(getattr(self, name)) for name in (
            "evaluate_gates", "audit_record", "audit_bundle", "verify", "audit_trail", "registry_status",
            "registry_request", "registry_approve", "registry_archive")}
        return {**operations, "act_as": self.act_as}


def _details(entry: Entry) -> dict[str, Any]:
    try:
        return json.loads(entry.details)
    except ValueError:
        return {}


def _gate_status(report: GateReport, evaluation_id: str, evaluated_at: datetime) -> dict[str, Any]:
    return {"overall": report.overall, "evaluation_id": evaluation_id, "evaluated_at": iso_utc(evaluated_at),
            "gates": {g.gate: g.status for g in report.gates}}
