"""Audit log signatures, anchors and the checks verify makes of them, without a store."""

import json
import stat
from dataclasses import replace
from datetime import datetime, timezone

import pytest

from trainwire.cli import main
from trainwire.infra.config import ConfigError, Settings
from trainwire.infra.store.audit_anchor import anchor_line, append_anchor, latest_anchor
from trainwire.infra.store.audit_chain import anchor_problems, next_entry, signature_problems, verify_log
from trainwire.infra.store.audit_config import AuditConfig
from trainwire.infra.store.audit_signing import (BUNDLE, TrustedKeys, ensure_home_key, signer_for,
                                                 write_key_pair)

T0 = datetime(2025, 6, 1, 12, tzinfo=timezone.utc)


@pytest.fixture
def signer(tmp_path):
    return signer_for(write_key_pair(tmp_path / "keys")[0])


def chain(count, signer=None, start=None):
    entries, previous = [], start
    for i in range(count):
        previous = next_entry(previous, "alice", "audit.viewed", "", {"i": i}, now=T0)
        if signer is not None:
            previous = replace(previous, key_id=signer.key_id, signature=signer.sign(previous.entry_hash))
        entries.append(previous)
    return entries


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(tmp_path):
    private, public = write_key_pair(tmp_path)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600 and "PUBLIC KEY" in public.read_text()
    with pytest.raises(FileExistsError, match="never overwrites"):
        write_key_pair(tmp_path)


def test_the_home_key_is_made_once(tmp_path):
    first = signer_for(ensure_home_key(tmp_path))
    assert signer_for(ensure_home_key(tmp_path)).key_id == first.key_id
    assert stat.S_IMODE((tmp_path / "audit-key.pem").stat().st_mode) == 0o600
    assert (tmp_path / "audit-key.pub.pem").is_file()


def test_a_signature_verifies_only_for_its_hash_key_and_purpose(signer, tmp_path):
    trusted = TrustedKeys([signer.public_key])
    signature = signer.sign("sha256:aa")
    assert trusted.problem("sha256:aa", signer.key_id, signature) is None
    assert trusted.problem("sha256:ab", signer.key_id, signature) == f"signature does not verify (key {signer.key_id})"
    assert trusted.problem("sha256:aa", signer.key_id, signature, BUNDLE) is not None  # an entry's is no bundle's
    assert trusted.problem("sha256:aa", signer.key_id, "not base64!") is not None
    stranger = signer_for(write_key_pair(tmp_path / "stranger")[0])
    assert trusted.problem("sha256:aa", stranger.key_id, stranger.sign("sha256:aa")) == (
        f"signed by a key that is not trusted ({stranger.key_id})")


def test_unsigned_entries_are_accepted_only_before_the_first_signed_one(signer, tmp_path):
    trusted = TrustedKeys([signer.public_key])
    legacy = chain(2)
    signed = chain(2, signer, start=legacy[-1])
    assert signature_problems(legacy + signed, trusted) == []
    forged = chain(2, start=signed[-1])
    assert signature_problems(legacy + signed + forged, trusted) == [
        "entry 4: not signed, after signed entry 2 (appended around trainwire)",
        "entry 5: not signed, after signed entry 2 (appended around trainwire)"]
    attacker = signer_for(write_key_pair(tmp_path / "attacker")[0])
    self_signed = chain(1, attacker, start=signed[-1])
    assert signature_problems(legacy + signed + self_signed, trusted) == [
        f"entry 4: signed by a key that is not trusted ({attacker.key_id})"]


def test_the_store_must_hold_the_anchored_head(signer):
    trusted, entries = TrustedKeys([signer.public_key]), chain(5, signer)
    head = entries[-1]
    anchored = anchor_line("chdb:/x", head.seq, head.entry_hash, head.key_id, head.signature)
    assert anchor_problems(entries, anchored, trusted, "file") == []
    assert anchor_problems(entries[:3], anchored, trusted, "file") == [
        f"truncated: the anchor records entry 4 with hash {head.entry_hash} (file); the store's last is entry 2"]
    other = replace(head, entry_hash="sha256:bb")
    assert anchor_problems(entries[:4] + [other], anchored, trusted, "file") == [
        f"rewritten: the anchor records entry 4 with hash {head.entry_hash} (file); the store's entry 4 has hash "
        "sha256:bb"]
    forged_anchor = {**anchored, "signature": entries[0].signature}
    assert anchor_problems(entries, forged_anchor, trusted, "file") == [
        f"file: the anchored head (entry 4): signature does not verify (key {signer.key_id})"]
    assert verify_log(entries, trusted, {"file": anchored, "kafka": None}).ok


def test_the_anchor_file_is_append_only_per_store_and_survives_a_torn_line(tmp_path):
    path = tmp_path / "anchor.log"
    for store, seq in [("chdb:/a", 1), ("chdb:/b", 9), ("chdb:/a", 3), ("chdb:/a", 2)]:
        append_anchor(path, anchor_line(store, seq, f"sha256:{seq}", "k", "s"))
    with open(path, "a") as handle:
        handle.write('{"store": "chdb:/a", "seq": 4')  # a crash mid-write
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert latest_anchor(path, "chdb:/a")["seq"] == 3
    assert latest_anchor(path, "chdb:/b")["entry_hash"] == "sha256:9"
    assert latest_anchor(path, "chdb:/c") is None and latest_anchor(tmp_path / "none.log", "chdb:/a") is None


def test_audit_settings_paths_and_a_missing_key_named_at_start(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRAINWIRE_AUDIT_PUBLIC_KEYS", json.dumps([str(tmp_path / "a.pem"), "~/b.pem"]))
    settings = Settings(home=tmp_path)
    assert settings.audit_public_keys[0] == tmp_path / "a.pem" and settings.audit_public_keys[1].is_absolute()
    config = AuditConfig.from_settings(settings)
    assert config.anchor_path == tmp_path / "audit-anchor.log" and config.key is None
    with pytest.raises(ConfigError, match="TRAINWIRE_AUDIT_PUBLIC_KEYS: .*a.pem"):
        config.check()
    monkeypatch.delenv("TRAINWIRE_AUDIT_PUBLIC_KEYS")
    monkeypatch.setenv("TRAINWIRE_HOME", str(tmp_path))
    monkeypatch.setenv("TRAINWIRE_AUDIT_KEY", str(tmp_path / "missing.pem"))
    assert main(["audit", "verify"]) == 2
    err = capsys.readouterr().err
    assert err == f"trainwire: error: TRAINWIRE_AUDIT_KEY: no such file {str(tmp_path / 'missing.pem')!r}\n"
