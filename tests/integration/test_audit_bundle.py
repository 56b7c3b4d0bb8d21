"""`trainwire audit export RUN_ID --out FILE` and `trainwire audit verify-bundle FILE`: a run's audit record and the
chain that vouches for it, checked offline with only the public key (no store, no home)."""

import json
import os
import shutil
import time

import pytest
from beside_up import cli as cli_beside, running_up
from test_governance import cli, ingest, simulated_run

from trainwire.cli import main
from trainwire.infra.config import Settings
from trainwire.infra.store.audit_bundle import bundle_bytes
from trainwire.infra.store.audit_chain import sha256_of
from trainwire.infra.store.audit_signing import write_key_pair
from trainwire.producers.session import close_all


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One run ingested, its bundle exported; the auditor gets the bundle and the public key, nothing else."""
    tmp_path = tmp_path_factory.mktemp("bundle")
    home = tmp_path / "home"
    with pytest.MonkeyPatch.context() as patch:  # module-scoped: the autouse fixture has not cleared these yet
        for name in [n for n in os.environ if n.startswith("TRAINWIRE_")]:
            patch.delenv(name)
        patch.setenv("TRAINWIRE_HOME", str(home))
        settings = Settings(home=home, batch_max_seconds=0.2)
        run = simulated_run(settings, tmp_path)
        close_all()
        ingest(settings)
        bundle = tmp_path / "bundle.json"
        assert main(["audit", "export", run.run_id, "--out", str(bundle)]) == 0
    auditor = tmp_path / "auditor"
    auditor.mkdir()
    shutil.copy(home / "audit-key.pub.pem", auditor / "trainwire.pub.pem")
    shutil.copy(bundle, auditor / "bundle.json")
    return run.run_id, auditor


@pytest.fixture
def offline(exported, tmp_path, monkeypatch):
    """The auditor's machine: a home that does not exist (and must stay so), no store."""
    monkeypatch.setenv("TRAINWIRE_HOME", str(tmp_path / "no-home"))
    yield exported
    assert not (tmp_path / "no-home").exists()


def test_an_exported_bundle_verifies_offline_with_the_public_key(offline, capsys):
    run_id, auditor = offline
    code, result, _ = cli(capsys, "audit", "verify-bundle", str(auditor / "bundle.json"), "--public-key",
                          str(auditor / "trainwire.pub.pem"), "--json")
    assert code == 0 and result["ok"] and result["run_id"] == run_id and result["keys"] == "given", result
    bundle = json.loads((auditor / "bundle.json").read_bytes())
    assert bundle["entries"][-1]["action"] == "audit.exported" and bundle["entries"][-1]["run_id"] == run_id
    assert {"input_artifacts", "training_record", "output_artifacts", "reproducibility"} <= set(bundle["record"])
    code, out, _ = cli(capsys, "audit", "verify-bundle", str(auditor / "bundle.json"))
    assert code == 0 and "audit bundle verified" in out and "the bundle's own" in out


def test_a_bundle_is_refused_with_another_key(offline, tmp_path, capsys):
    _, auditor = offline
    _, other = write_key_pair(tmp_path / "other")
    code, result, _ = cli(capsys, "audit", "verify-bundle", str(auditor / "bundle.json"), "--public-key", str(other),
                          "--json")
    assert code == 1 and any("signed by a key that is not trusted" in p for p in result["problems"])


def test_a_bundle_edited_by_one_byte_fails(offline, tmp_path, capsys):
    _, auditor = offline
    original = (auditor / "bundle.json").read_bytes()
    edited = tmp_path / "edited.json"
    for position in range(0, len(original), max(1, len(original) // 40)):  # about 40 places across the file
        data = bytearray(original)
        data[position] = ord("1") if data[position] != ord("1") else ord("2")
        edited.write_bytes(bytes(data))
        code, result, _ = cli(capsys, "audit", "verify-bundle", str(edited), "--public-key",
                              str(auditor / "trainwire.pub.pem"), "--json")
        assert code == 1 and not result["ok"], f"byte {position} edited, yet the bundle verified"


def test_a_record_swapped_in_canonical_form_is_refused(offline, tmp_path, capsys):
    """Rewritten as trainwire writes bundles: the bundle's signature and the log's hash of the record both fail."""
    run_id, auditor = offline
    bundle = json.loads((auditor / "bundle.json").read_bytes())
    bundle["record"]["registry_stage"] = "Production"
    swapped = tmp_path / "swapped.json"
    swapped.write_bytes(bundle_bytes(bundle))
    code, result, _ = cli(capsys, "audit", "verify-bundle", str(swapped), "--public-key",
                          str(auditor / "trainwire.pub.pem"), "--json")
    assert code == 1 and result["problems"] == [
        f"the bundle as a whole: signature does not verify (key {bundle['signature']['key_id']})",
        f"the record of run {run_id} is not the one the log vouches for (no audit.exported entry with its hash "
        f"{sha256_of(bundle['record'])})"]


def test_export_goes_through_up_when_it_owns_the_store(tmp_path):
    home = tmp_path / "home"
    with running_up(home):
        run = simulated_run(Settings(home=home), tmp_path, name="beside-up")
        close_all()
        deadline = time.monotonic() + 60
        while cli_beside(home, "runs", "--json", check=False).stdout.count(run.run_id) == 0:
            assert time.monotonic() < deadline, "the run never reached the store"
            time.sleep(0.5)
        cli_beside(home, "audit", "export", run.run_id, "--out", str(tmp_path / "bundle.json"))
    result = cli_beside(tmp_path / "no-home", "audit", "verify-bundle", str(tmp_path / "bundle.json"),
                        "--public-key", str(home / "audit-key.pub.pem"), "--json", check=False)
    assert result.returncode == 0 and json.loads(result.stdout)["run_id"] == run.run_id, result.stderr
