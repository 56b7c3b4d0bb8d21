"""Tampering by someone with write access to the store, caught by `trainwire audit verify`.

Forged appends: entries chained exactly as trainwire chains them (the hash function is no secret), inserted with a
plain clickhouse-connect insert, put a run into Production in the registry's eyes. A truncated tail: the last
entries deleted, or the table re-created without them, leaves a chain that links perfectly. Real embedded
ClickHouse (chdb); the CLI through `trainwire.cli.main`.
"""

import json

import pytest
from test_governance import cli, home  # noqa: F401 - home is a fixture

from trainwire.infra.store import connect_store
from trainwire.infra.store.audit_chain import Entry, next_entry
from trainwire.infra.store.read import StoreReader

# What an attacker writes: the columns of the log as they were before signing (no key id, no signature).
CHAINED_COLUMNS = ["seq", "ts", "actor", "action", "run_id", "details", "prev_hash", "entry_hash"]
RUN = "11111111-2222-3333-4444-555555555555"


@pytest.fixture
def logged(home, capsys):
    """A log of a few genuine entries that verifies; the store's client for the attacker."""
    for _ in range(3):
        assert cli(capsys, "audit", "log", "--json")[0] == 0
    code, verified, _ = cli(capsys, "audit", "verify", "--json")
    assert code == 0 and verified["ok"], verified
    client = connect_store(home.store_dsn)
    yield client
    client.close()


def _head(client) -> Entry:
    row = StoreReader(client).audit_head()
    return Entry(**{k: row[k] for k in CHAINED_COLUMNS})


def _forge_promotion(client, head: Entry) -> list[Entry]:
    """Three properly chained registry transitions that put RUN into Production, with no gate or approval."""
    forged, previous = [], head
    for actor, from_stage, to_stage in [("trainwire", "None", "Candidate"), ("alice", "Candidate", "Staging"),
                                        ("bob", "Staging", "Production")]:
        previous = next_entry(previous, actor, "registry.transition", RUN,
                              {"from": from_stage, "to": to_stage, "reason": ""})
        forged.append(previous)
    client.insert("audit_log", [[getattr(e, c) for c in CHAINED_COLUMNS] for e in forged],
                  column_names=CHAINED_COLUMNS)
    return forged


def test_forged_appends_are_caught_and_named(logged, capsys):
    forged = _forge_promotion(logged, _head(logged))
    store = StoreReader(logged)
    assert store.registry_history(RUN) == [] and RUN not in {r["run_id"] for r in store.registry_stages()}
    assert [(u["seq"], u["to_stage"]) for u in store.unvouched_transitions(RUN)] == [
        (e.seq, json.loads(e.details)["to"]) for e in forged]

    code, verified, _ = cli(capsys, "audit", "verify", "--json")
    assert code == 1 and not verified["ok"]
    for entry in forged:
        assert any(p.startswith(f"entry {entry.seq}: not signed") for p in verified["problems"]), verified
    code, out, _ = cli(capsys, "audit", "verify")
    assert code == 1 and "AUDIT LOG DOES NOT VERIFY" in out and f"entry {forged[-1].seq}: not signed" in out


def test_forged_appends_carrying_a_copied_signature_are_caught(logged, capsys):
    genuine = StoreReader(logged).audit_head()
    forged = _forge_promotion(logged, _head(logged))
    # the attacker copies a genuine entry's key id and signature onto each forged one
    logged.command(f"ALTER TABLE audit_log UPDATE key_id = '{genuine['key_id']}', signature = "
                   f"'{genuine['signature']}' WHERE run_id = '{RUN}' SETTINGS mutations_sync = 2")
    code, verified, _ = cli(capsys, "audit", "verify", "--json")
    assert code == 1
    for entry in forged:
        assert f"entry {entry.seq}: signature does not verify (key {genuine['key_id']})" in verified["problems"]
    assert StoreReader(logged).registry_history(RUN) == []


def test_a_truncated_tail_is_caught(logged, capsys):
    head = StoreReader(logged).audit_head()
    logged.command(f"ALTER TABLE audit_log DELETE WHERE seq > {head['seq'] - 3} SETTINGS mutations_sync = 2")

    code, verified, _ = cli(capsys, "audit", "verify", "--json")
    assert code == 1
    truncated = [p for p in verified["problems"] if p.startswith("truncated")]
    assert truncated and truncated[0].startswith(
        f"truncated: the anchor records entry {head['seq']} with hash {head['entry_hash']}"), verified
    # the log still takes entries (verify logged itself), though the deleted entries' seqs were taken before
    assert StoreReader(logged).audit_head()["seq"] == head["seq"] - 2


def test_a_log_recreated_without_its_tail_is_caught(logged, capsys):
    head = StoreReader(logged).audit_head()
    logged.command("CREATE TABLE audit_log_copy AS audit_log")
    logged.command(f"INSERT INTO audit_log_copy SELECT * FROM audit_log WHERE seq < {head['seq']}")
    logged.command("DROP TABLE audit_log")
    logged.command("RENAME TABLE audit_log_copy TO audit_log")

    code, verified, _ = cli(capsys, "audit", "verify", "--json")
    assert code == 1
    assert any(p.startswith(f"truncated: the anchor records entry {head['seq']} with hash {head['entry_hash']}")
               for p in verified["problems"]), verified


def test_a_rewritten_tail_is_caught(logged, capsys):
    head = StoreReader(logged).audit_head()
    logged.command(f"ALTER TABLE audit_log DELETE WHERE seq = {head['seq']} SETTINGS mutations_sync = 2")
    previous = _head(logged)
    rewritten = next_entry(previous, "mallory", "audit.verified", "", {"ok": True})
    logged.insert("audit_log", [[getattr(rewritten, c) for c in CHAINED_COLUMNS]], column_names=CHAINED_COLUMNS)

    code, verified, _ = cli(capsys, "audit", "verify", "--json")
    assert code == 1
    assert any(p.startswith(f"rewritten: the anchor records entry {head['seq']} with hash {head['entry_hash']}")
               for p in verified["problems"]), verified


@pytest.mark.kafka
def test_heads_published_to_kafka_catch_a_truncation_the_anchor_file_no_longer_can(kafka_settings):
    from trainwire.consumers.governance import Governance
    from trainwire.infra.store import migrate
    from trainwire.infra.store.audit_anchor import published_head
    from trainwire.infra.store.audit_chain import append_entry
    from trainwire.infra.store.audit_config import configure_audit, store_identity

    config = configure_audit(kafka_settings)
    client = connect_store(kafka_settings.store_dsn)
    migrate(client)
    for i in range(3):
        append_entry(client, "alice", "audit.viewed", "", {"i": i})
    head = StoreReader(client).audit_head()
    assert published_head(kafka_settings, store_identity(client))["entry_hash"] == head["entry_hash"]

    config.anchor_path.unlink()  # this home's anchor gone too: the topic still holds the head
    client.command(f"ALTER TABLE audit_log DELETE WHERE seq = {head['seq']} SETTINGS mutations_sync = 2")
    verified = Governance(client).verify("auditor")
    topic = kafka_settings.topic("audit-head")
    assert verified["problems"] == [f"truncated: the anchor records entry {head['seq']} with hash "
                                    f"{head['entry_hash']} (Kafka topic {topic}); the store's last is entry "
                                    f"{head['seq'] - 1}"]
    client.close()
