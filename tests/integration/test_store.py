"""The embedded ClickHouse schema: idempotent migrations, retention by TTL, de-duplicated reads."""

import time

import pytest

from trainwire.consumers.rows import columns_of, to_row
from trainwire.infra.store import apply_retention, connect_store, migrate
from trainwire.infra.store.read import StoreReader
from trainwire.schemas import GpuSample, RunStarted, Step

DAY_MS = 86_400_000


@pytest.fixture
def client(tmp_path):
    client = connect_store(f"chdb://{tmp_path / 'chdb'}")
    migrate(client)
    yield client
    client.close()  # chdb holds one data directory per process until its clients close


def insert(client, table, kind, events):
    client.insert(table, [to_row(kind, e.model_dump()) for e in events], column_names=columns_of(kind))


def test_migrations_apply_once(client):
    assert migrate(client) == []  # a second start applies nothing
    versions = [r[0] for r in client.query("SELECT version FROM schema_migrations FINAL ORDER BY version").result_rows]
    assert versions == sorted(set(versions)) and versions[0] == 1


def test_rows_older_than_their_retention_are_removed_and_permanent_ones_stay(client):
    now = time.time_ns() // 1_000_000
    old, recent = now - 45 * DAY_MS, now - 1 * DAY_MS
    insert(client, "steps", "step", [Step(run_id="r", experiment="e", seq=i, step=i, loss=1.0, ts_ms=ts)
                                     for i, ts in enumerate([old, old, recent])])
    insert(client, "gpu_samples", "gpu_sample", [
        GpuSample(run_id="r", experiment="e", seq=i, gpu_index=0, gpu_uuid="GPU-0", ts_ms=ts)
        for i, ts in enumerate([now - 10 * DAY_MS, recent])])
    insert(client, "run_started", "run_started", [RunStarted(run_id="r", experiment="e", seq=0, ts_ms=old)])

    apply_retention(client, metrics_days=30, gpu_days=7)
    for table in ("steps", "gpu_samples", "run_started"):
        client.command(f"OPTIMIZE TABLE {table} FINAL")
    reader = StoreReader(client)
    assert [s["step"] for s in reader.steps("r")] == [2]
    assert reader.event_counts(["r"])["gpu_samples"] == 1
    assert reader.run_started("r") is not None, "runs are kept for good"

    apply_retention(client, metrics_days=90, gpu_days=30)  # idempotent, and takes the new values
    ttl = client.query("SELECT create_table_query FROM system.tables WHERE name = 'steps'").result_rows[0][0]
    assert "toIntervalDay(90)" in ttl


def test_a_redelivered_event_is_one_row_in_every_read(client):
    event = Step(run_id="r", experiment="e", seq=0, step=1, loss=2.0)
    insert(client, "steps", "step", [event])
    insert(client, "steps", "step", [event])  # the same event again, as a redelivery inserts it
    reader = StoreReader(client)
    assert len(reader.steps("r")) == 1 and reader.events_stored(["r"]) == 1
