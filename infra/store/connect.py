from __future__ import annotations

import logging
import re
import threading
from importlib import resources

import clickhouse_connect
from clickhouse_connect.driver.client import Client

log = logging.getLogger(__name__)
_MIGRATION = re.compile(r"^(?P<version>\d{3})_[a-z0-9_]+\.sql$")
_migrate_lock = threading.Lock()


def connect_store(dsn: str) -> Client:
    """One client per caller; chdb allows one process per data directory but many clients inside it."""
    if dsn.startswith("chdb://"):
        from pathlib import Path

        Path(dsn.removeprefix("chdb://")).mkdir(parents=True, exist_ok=True)
    return clickhouse_connect.get_client(dsn=dsn)


def _statements(sql: str) -> list[str]:
    lines = [line for line in sql.splitlines() if not line.lstrip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


# Retention (spec §8): per-step metrics and evals keep `metrics_days`, GPU samples and heartbeats `gpu_days`;
# runs, configs, checkpoints, alerts and dead letters are permanent.
RETENTION_TABLES = {"steps": "metrics", "evals": "metrics", "gpu_samples": "gpu", "heartbeats": "gpu"}


def apply_retention(client: Client, metrics_days: int, gpu_days: int) -> None:
    """Set each time-series table's TTL; idempotent, so every start applies the configured values."""
    days = {"metrics": metrics_days, "gpu": gpu_days}
    for table, kind in RETENTION_TABLES.items():
        client.command(f"ALTER TABLE {table} MODIFY TTL toDateTime(ts) + INTERVAL {int(days[kind])} DAY")


def migrate(client: Client, up_to: int | None = None) -> list[str]:
    """Apply the versioned migrations not yet applied (up to version `up_to`, default all); idempotent, so every
    process may call it at start."""
    with _migrate_lock:
        client.command(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version UInt32, name String, "
            "applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) ENGINE = ReplacingMergeTree ORDER BY version"
        )
        done = {row[0] for row in client.query("SELECT version FROM schema_migrations FINAL").result_rows}
        applied = []
        for entry in sorted(resources.files(__package__).joinpath("migrations").iterdir(), key=lambda e: e.name):
            match = _MIGRATION.match(entry.name)
            if not match or int(match["version"]) in done or (up_to is not None and int(match["version"]) > up_to):
                continue
            for statement in _statements(entry.read_text()):
                client.command(statement)
            client.insert("schema_migrations", [[int(match["version"]), entry.name]], column_names=["version", "name"])
            applied.append(entry.name)
            log.info("applied migration %s", entry.name)
        return applied
