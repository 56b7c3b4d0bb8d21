"""The embedded ClickHouse schema: idempotent migrations, retention by TTL, de-duplicated reads."""

import time

from trainwire.consumers.rows import columns_of, to_row
from trainwire.infra.store import apply_retention, connect_store, migrate
from trainwire.infra.store.read import StoreReader
from trainwire.schemas import GpuSample, RunStarted, Step

DAY_MS = 86_400_000


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


def _crafted_run(run_id: str, start_ms: int, steps: int = 450) -> list:
    """Steps every 0.5 s across several minutes and 100-step buckets, with NaN, Inf and missing losses."""
    events = []
    for i in range(steps):
        loss = {97: float("nan"), 205: float("inf"), 301: None}.get(i, 3.0 / (1 + i) + (i % 7) * 0.01)
        events.append(Step(run_id=run_id, experiment="exp", seq=i + 1, step=i, loss=loss, learning_rate=1e-4 * i,
                           grad_norm=(i % 13) * 0.9, tokens_per_s=1000.0 + i, ts_ms=start_ms + i * 500))
    return events


def _write(client, events):
    from trainwire.consumers.writer import ClickHouseWriter

    writer = ClickHouseWriter(client)
    writer.write({"step": [to_row("step", e.model_dump()) for e in events]}, [])
    return writer


_RAW_BY_MINUTE = """
SELECT run_id, toStartOfMinute(ts) AS minute, count(), min(step), max(step),
       round(sumIf(assumeNotNull(loss), isFinite(assumeNotNull(loss)) AND isNotNull(loss)), 9),
       countIf(isFinite(assumeNotNull(loss)) AND isNotNull(loss)),
       minIfOrNull(assumeNotNull(loss), isFinite(assumeNotNull(loss)) AND isNotNull(loss)),
       countIf(NOT isFinite(assumeNotNull(loss)) AND isNotNull(loss)), argMax(learning_rate, step),
       maxIfOrNull(assumeNotNull(grad_norm), isNotNull(grad_norm))
FROM steps FINAL GROUP BY run_id, minute ORDER BY run_id, minute
"""
_ROLLUP_BY_MINUTE = """
SELECT run_id, minute, sum(steps), min(first_step), max(last_step), round(sum(loss_sum), 9), sum(loss_count),
       min(loss_min), sum(loss_not_finite), argMaxMerge(learning_rate_last), max(grad_norm_max)
FROM steps_1m GROUP BY run_id, minute ORDER BY run_id, minute
"""


def test_rollups_agree_with_raw_aggregates_even_when_a_batch_is_delivered_twice(client):
    start = (time.time_ns() // 1_000_000) - 3_600_000
    runs = {"run-a": _crafted_run("run-a", start), "run-b": _crafted_run("run-b", start + 90_000, steps=230)}
    a = runs["run-a"]
    writer = _write(client, a[:97] + runs["run-b"])
    for chunk in (a[97:98], a[98:200], a[150:]):  # a minute split across inserts, one part only a NaN loss
        writer.write({"step": [to_row("step", e.model_dump()) for e in chunk]}, [])
    assert writer.redeliveries_skipped == 50

    by_minute = client.query(_RAW_BY_MINUTE).result_rows
    assert len(by_minute) >= 6 and client.query(_ROLLUP_BY_MINUTE).result_rows == by_minute
    per_100 = client.query(
        "SELECT run_id, bucket, sum(steps), round(sum(loss_sum), 9), sum(loss_not_finite), argMaxMerge(loss_last) "
        "FROM steps_100 GROUP BY run_id, bucket ORDER BY run_id, bucket").result_rows
    raw_100 = client.query(
        "SELECT run_id, intDiv(step, 100) AS bucket, count(), "
        "round(sumIf(assumeNotNull(loss), isFinite(assumeNotNull(loss)) AND isNotNull(loss)), 9), "
        "countIf(NOT isFinite(assumeNotNull(loss)) AND isNotNull(loss)), argMax(loss, step) "
        "FROM steps FINAL GROUP BY run_id, bucket ORDER BY run_id, bucket").result_rows
    assert per_100 == raw_100 and [r[1] for r in per_100 if r[0] == "run-a"] == [0, 1, 2, 3, 4]
    runs_table = client.query("SELECT run_id, sum(steps_logged), max(last_step) FROM runs GROUP BY run_id "
                              "ORDER BY run_id").result_rows
    assert runs_table == [("run-a", 450, 449), ("run-b", 230, 229)]


def test_a_store_migrated_before_rollups_existed_is_backfilled(tmp_path):
    client = connect_store(f"chdb://{tmp_path / 'chdb'}")
    try:
        migrate(client, up_to=2)
        events = _crafted_run("old-run", (time.time_ns() // 1_000_000) - 7_200_000, steps=120)
        insert(client, "steps", "step", events + events[:10])  # an old store may hold duplicate rows
        assert [m.split("_")[0] for m in migrate(client)][0] == "003"
        assert client.query(_ROLLUP_BY_MINUTE).result_rows == client.query(_RAW_BY_MINUTE).result_rows
        assert client.query("SELECT sum(steps) FROM steps_1m").result_rows[0][0] == 120
    finally:
        client.close()
