"""Governance end to end: simulated runs end → ingest evaluates their gates → registry, audit, tamper evidence.

Real local log, real ingest pipeline, real embedded ClickHouse (chdb); the CLI through `trainwire.cli.main`.
"""

import json
import os
import time

import pytest
from beside_up import cli as cli_beside, running_up
from tests.acting import OS_USER, roles_file

from trainwire.cli import main
from trainwire.infra.config import Settings
from trainwire.consumers.ingest import IngestPipeline, event_topics
from trainwire.consumers.service import INGEST_GROUP, build_ingest
from trainwire.consumers.writer import ClickHouseWriter
from trainwire.infra.log import open_consumer
from trainwire.infra.store import connect_store, migrate
from trainwire.infra.store.read import StoreReader
from trainwire.producers import init
from trainwire.producers.environment import sha256_file
from trainwire.producers.lineage import dataset_lineage
from trainwire.producers.session import close_all
from trainwire.producers.simulate import JobPlan, run_job

SHA256_PREFIX = "sha256:"


def simulated_run(settings, tmp_path, fault=None, name="job"):
    """A simulated fine-tune with the lineage G6 wants: dataset and config hashed, git commit, seed, artifacts."""
    dataset = tmp_path / "train.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(50)))
    config = tmp_path / "train.yaml"
    config.write_text("learning_rate: 2.0e-4\nlora_rank: 16\n")
    adapter = tmp_path / "adapter_model.safetensors"
    adapter.write_bytes(os.urandom(256))
    run = init("gov-sft", name, {"learning_rate": 2e-4, "lora_rank": 16}, settings=settings, sample_gpus=False,
               base_model="llama-3-8b", base_model_revision="8cde5ca", config_file=config.name,
               config_sha256=sha256_file(config), git_commit="a" * 40, git_dirty=False, seed=42,
               environment={"python": "3.11.7", "torch": "2.3.0"}, total_steps=120,
               **dataset_lineage(dataset))
    run_job(run, JobPlan(steps=120, fault=fault, seed=3))
    run.finish("completed", artifacts=[{"name": adapter.name, "size": 256, "sha256": sha256_file(adapter)}])
    return run


def ingest(settings):
    pipeline = build_ingest(settings, on_alert=lambda alert: None)
    pipeline.drain(idle_seconds=1.0)
    pipeline.close()


def cli(capsys, *args):
    code = main([*args])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if "--json" in args and code in (0, 1) else out), err


@pytest.fixture
def home(local_settings, monkeypatch):
    for key in [k for k in os.environ if k.startswith("TRAINWIRE_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("TRAINWIRE_HOME", str(local_settings.home))
    return local_settings


@pytest.fixture
def acting_for_others(home):
    roles_file(home.home / "roles.toml")
    return home


def audit_log(home):
    client = connect_store(home.store_dsn)
    try:
        return StoreReader(client).audit_log()
    finally:
        client.close()


def test_run_end_evaluates_gates_and_a_passing_run_becomes_candidate(home, tmp_path, capsys):
    good = simulated_run(home, tmp_path, name="good")
    diverged = simulated_run(home, tmp_path, fault="nan", name="nan")
    close_all()
    ingest(home)

    reader = StoreReader(connect_store(home.store_dsn))
    [evaluation] = reader.gate_results(good.run_id)
    assert evaluation["trigger"] == "run_end" and evaluation["actor"] == "trainwire"
    assert evaluation["overall"] == "passed", evaluation["gates"]
    assert evaluation["inputs"]["steps_logged"] == 120 and evaluation["inputs"]["final_loss"] is not None
    assert [(h["from_stage"], h["to_stage"]) for h in reader.registry_history(good.run_id)] == [("None", "Candidate")]

    [blocked] = reader.gate_results(diverged.run_id)
    assert blocked["overall"] == "blocked"
    assert {g["gate"]: g["status"] for g in blocked["gates"]}["G1"] == "failed"
    assert reader.registry_history(diverged.run_id) == []

    code, status, _ = cli(capsys, "registry", "status", good.run_id, "--json")
    assert code == 0 and status["stage"] == "Candidate" and status["gates"] == "passed"
    code, status, _ = cli(capsys, "registry", "status", diverged.run_id, "--json")
    assert status["stage"] is None  # not in the registry yet: null, not the string "None"

    # on demand: exit codes follow the overall status, and every evaluation is stored
    code, result, _ = cli(capsys, "gates", good.run_id, "--json")
    assert code == 0 and result["overall"] == "passed" and result["trigger"] == "on_demand"
    code, result, _ = cli(capsys, "gates", diverged.run_id)
    assert code == 2 and "BLOCKED" in result
    assert ["G1", "stability"] in [line.split()[:2] for line in result.split("\n")]
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps({"eval_loss": 0.2}))  # far better than this run: G4 blocks
    code, _, _ = cli(capsys, "gates", good.run_id, "--baseline", str(baseline), "--json")
    assert code == 2
    assert [g["overall"] for g in reader.gate_results(good.run_id)] == ["blocked", "passed", "passed"]
    code, result, _ = cli(capsys, "gates", good.run_id, "--baseline", diverged.run_id, "--json")
    assert code == 0 and result["baseline"] == f"run:{diverged.run_id}"
    assert result["gates"][3]["message"] == "the baseline's eval_loss is nan: nothing to compare with"

    # the audit record: four sections, hashes as sha256:<hex>, ISO 8601 UTC times
    code, record, _ = cli(capsys, "audit", good.run_id, "--json")
    assert code == 0
    assert {"input_artifacts", "training_record", "output_artifacts", "reproducibility"} <= set(record)
    inputs, outputs = record["input_artifacts"], record["output_artifacts"]
    assert inputs["dataset"]["sha256"].startswith(SHA256_PREFIX) and inputs["dataset"]["samples"] == 50
    assert inputs["config"]["sha256"].startswith(SHA256_PREFIX)
    assert outputs["artifacts"][0]["sha256"].startswith(SHA256_PREFIX)
    assert outputs["training_args"]["sha256"].startswith(SHA256_PREFIX)
    assert outputs["gate_status"]["overall"] == "passed"
    assert record["training_record"]["started_at"].endswith("Z") and record["training_record"]["completed_steps"] == 120
    assert [c["step"] for c in record["training_record"]["checkpoints"]] == [100]
    assert record["reproducibility"]["seeds"]["seed"] == 42
    exported = tmp_path / "audit.json"
    assert cli(capsys, "audit", good.run_id, "--export", str(exported))[0] == 0
    assert json.loads(exported.read_text())["run_id"] == good.run_id

    # who accessed and changed what
    code, entries, _ = cli(capsys, "audit", "log", "--run", good.run_id, "--json")
    actions = [e["action"] for e in entries]
    assert actions[:2] == ["gates.evaluated", "registry.transition"]
    assert "audit.viewed" in actions and "audit.exported" in actions and "registry.viewed" in actions
    assert {e["actor"] for e in entries} == {"trainwire", OS_USER}  # --actor defaults to the OS user


def test_registry_path_to_production_and_tampering_detected(acting_for_others, tmp_path, capsys):
    home = acting_for_others
    first = simulated_run(home, tmp_path, name="first")
    second = simulated_run(home, tmp_path, name="second")
    close_all()
    ingest(home)

    code, _, err = cli(capsys, "registry", "approve", first.run_id, "--actor", "bob")
    assert code == 2 and f"run {first.run_id}: Candidate → Production refused: not an allowed transition" in err
    code, _, err = cli(capsys, "registry", "request", first.run_id, "--actor", "alice", "--reason", "ship it")
    assert code == 0, err
    for respelt in ("alice", "Alice ", "ＡＬＩＣＥ", "alice\u200b"):  # one person, however spelt
        code, _, err = cli(capsys, "registry", "approve", first.run_id, "--actor", respelt)
        assert code == 2 and "approver must be someone other than the requester (alice)" in err, respelt
    refused = [e for e in audit_log(home) if e["action"] == "registry.refused"]
    assert [e["actor"] for e in refused] == ["bob"] + ["alice"] * 4
    details = json.loads(refused[2]["details"])
    assert details["from"] == "Staging" and details["to"] == "Production"
    assert "approver must be someone other than the requester" in details["refusal"]
    code, moved, _ = cli(capsys, "registry", "approve", first.run_id, "--actor", "bob", "--json")
    assert code == 0 and moved["stage"] == "Production" and moved["from"] == "Staging"
    code, _, err = cli(capsys, "registry", "archive", first.run_id, "--actor", "carol")
    assert code == 2 and "archiving needs a reason" in err
    code, status, _ = cli(capsys, "registry", "status", first.run_id, "--json")
    assert [(h["from"], h["to"], h["actor"], h["reason"]) for h in status["history"]] == [
        (None, "Candidate", "trainwire", status["history"][0]["reason"]),
        ("Candidate", "Staging", "alice", "ship it"), ("Staging", "Production", "bob", "")]
    assert status["history"][0]["reason"].startswith("all gates passed")

    code, verified, _ = cli(capsys, "audit", "verify", "--json")
    assert code == 0 and verified["ok"] and verified["entries"] > 6
    head = verified["head"]

    # an auditor's view: change the requester of a stored transition behind trainwire's back
    client = connect_store(home.store_dsn)
    seq = next(e["seq"] for e in StoreReader(client).audit_log(first.run_id)
               if e["action"] == "registry.transition" and '"to":"Staging"' in e["details"])
    client.command(f"ALTER TABLE audit_log UPDATE actor = 'mallory' WHERE seq = {seq} SETTINGS mutations_sync = 2")
    code, verified, _ = cli(capsys, "audit", "verify", "--json")
    assert code == 1 and verified["problems"] == [f"entry {seq}: altered (its hash does not match its contents)"]
    code, out, _ = cli(capsys, "audit", "verify")
    assert code == 1 and "AUDIT LOG DOES NOT VERIFY" in out and f"entry {seq}: altered" in out

    # with the trail broken, nothing reaches Production
    assert cli(capsys, "registry", "request", second.run_id, "--actor", "alice")[0] == 0
    code, _, err = cli(capsys, "registry", "approve", second.run_id, "--actor", "bob")
    assert code == 2 and f"audit trail does not verify: entry {seq}: altered" in err

    # deleting an entry, or altering a stored gate evaluation, is caught too
    client.command(f"ALTER TABLE audit_log DELETE WHERE seq = {seq + 1} SETTINGS mutations_sync = 2")
    client.command(f"ALTER TABLE gate_results UPDATE overall = 'blocked' WHERE run_id = '{second.run_id}' "
                   "SETTINGS mutations_sync = 2")
    code, verified, _ = cli(capsys, "audit", "verify", "--head", head, "--json")
    assert code == 1
    assert f"entries {seq + 1}: missing (deleted)" in verified["problems"]
    assert any(p.endswith(f"of run {second.run_id}: altered") for p in verified["problems"])
    client.close()


def test_roles_file_named_by_trainwire_roles_is_enforced(home, tmp_path, capsys, monkeypatch):
    roles = roles_file(tmp_path / "roles.toml", requester=["alice"], approver=["carol"], archiver=["carol"])
    monkeypatch.setenv("TRAINWIRE_ROLES", str(roles))
    run = simulated_run(home, tmp_path, name="roles")
    close_all()
    ingest(home)
    code, _, err = cli(capsys, "registry", "request", run.run_id, "--actor", "bob")
    assert code == 2 and "bob does not hold the requester role" in err
    assert cli(capsys, "registry", "request", run.run_id, "--actor", "alice")[0] == 0
    code, _, err = cli(capsys, "registry", "approve", run.run_id, "--actor", "bob")
    assert code == 2 and "bob does not hold the approver role" in err
    assert cli(capsys, "registry", "approve", run.run_id, "--actor", "carol")[0] == 0

    monkeypatch.setenv("TRAINWIRE_ROLES", str(tmp_path / "missing.toml"))
    code, _, err = cli(capsys, "registry", "status", run.run_id)
    assert code == 2 and "TRAINWIRE_ROLES: no such file" in err


def test_runs_that_ended_while_no_gate_worker_ran_are_evaluated_at_the_next_start(home, tmp_path):
    run = simulated_run(home, tmp_path, name="left-behind")
    close_all()
    client = connect_store(home.store_dsn)
    migrate(client)
    without_gates = IngestPipeline(open_consumer(home, home.topic(INGEST_GROUP), event_topics(home)),
                                   ClickHouseWriter(client), None, home, on_alert=lambda alert: None)
    without_gates.drain(idle_seconds=1.0)
    without_gates.close()
    reader = StoreReader(connect_store(home.store_dsn))
    assert reader.runs_awaiting_gates() == [run.run_id]

    ingest(home)  # nothing new to consume; its gate worker picks the run up at start
    assert [e["trigger"] for e in reader.gate_results(run.run_id)] == ["run_end"]
    assert reader.runs_awaiting_gates() == []


def test_unknown_run_and_bad_baseline_are_clear_errors(home, tmp_path, capsys):
    ingest(home)  # an empty, migrated store
    code, _, err = cli(capsys, "gates", "no-such-run")  # 6, not 2: `gates` exits 2 for "blocked"
    assert code == 6 and "no run 'no-such-run' in the store" in err
    code, _, err = cli(capsys, "gates", "no-such-run", "--metric", "reward")
    assert code == 8 and "metric 'reward': unknown direction" in err
    bad = tmp_path / "baseline.json"
    bad.write_text('{"eval_loss": "low"}')
    code, _, err = cli(capsys, "gates", "no-such-run", "--baseline", str(bad))
    assert code == 8 and "eval_loss must be a number" in err


def test_registry_commands_go_through_up_when_it_owns_the_store(tmp_path, monkeypatch):
    home = tmp_path / "home"

    def run_cli(*args):
        result = cli_beside(home, *args, check=False)
        return result.returncode, result.stdout, result.stderr

    with running_up(home):  # no roles file: nobody may act for anyone else
        run = simulated_run(Settings(home=home), tmp_path, name="beside-up")
        close_all()

        deadline, stage = time.monotonic() + 120, None
        while stage != "Candidate" and time.monotonic() < deadline:
            code, out, err = run_cli("registry", "status", run.run_id, "--json")
            stage = json.loads(out)["stage"] if code == 0 else None
            time.sleep(0.5)
        assert stage == "Candidate", err

        code, _, err = run_cli("registry", "request", run.run_id, "--actor", "alice")
        assert code == 2 and err.strip() == (f"trainwire: error: --actor 'alice' refused: {OS_USER} is not in "
                                             f"act_for_others of the roles file, so may act only as {OS_USER}")
        code, out, err = run_cli("registry", "request", run.run_id, "--json")
        assert code == 0 and json.loads(out)["stage"] == "Staging" and json.loads(out)["actor"] == OS_USER, err
        monkeypatch.setenv("USER", "someone-else")  # anyone can set these; who acts stays the OS user
        monkeypatch.setenv("LOGNAME", "someone-else")
        code, _, err = run_cli("registry", "approve", run.run_id)
        assert code == 2 and f"approver must be someone other than the requester ({OS_USER})" in err
        monkeypatch.undo()
        code, _, err = run_cli("registry", "approve", run.run_id, "--actor", f" {OS_USER.upper()}")
        assert code == 2 and "approver must be someone other than the requester" in err
        code, out, _ = run_cli("audit", "log", "--json")
        entries = json.loads(out)
        assert [(e["actor"], json.loads(e["details"])["claimed"]) for e in entries
                if e["action"] == "actor.refused"] == [(OS_USER, "alice")]
        assert [e["actor"] for e in entries if e["action"] == "registry.refused"] == [OS_USER, OS_USER]
        code, out, _ = run_cli("audit", "verify", "--json")
        assert code == 0 and json.loads(out)["ok"]
    # up is gone: the same history, read from the store directly
    code, out, _ = run_cli("registry", "status", run.run_id, "--json")
    assert [h["to"] for h in json.loads(out)["history"]] == ["Candidate", "Staging"]


def test_acting_as_someone_else_needs_act_for_others_in_the_roles_file(home, capsys):
    ingest(home)  # an empty, migrated store
    for command in (["registry", "status"], ["audit", "log"],
                    ["alerts", "silence", "--rule", "loss_spike", "--for", "1h", "--reason", "noisy"]):
        code, out, err = cli(capsys, *command, "--actor", "bob")
        assert code == 2 and out == "" and err.count("\n") == 1 and "--actor 'bob' refused" in err, command
    code, _, _ = cli(capsys, "registry", "status", "--actor", f"{OS_USER.upper()} ")  # oneself, respelt
    assert code == 0
    refused = [e for e in audit_log(home) if e["action"] == "actor.refused"]
    assert [(e["actor"], json.loads(e["details"])["claimed"]) for e in refused] == [(OS_USER, "bob")] * 3

    roles_file(home.home / "roles.toml")
    code, _, _ = cli(capsys, "registry", "status", "--actor", "Bob")
    assert code == 0
    viewed = [e["actor"] for e in audit_log(home) if e["action"] == "registry.viewed"]
    assert viewed == [OS_USER, "bob"]
    assert len([e for e in audit_log(home) if e["action"] == "actor.refused"]) == 3
