"""ClickHouse, reached only through clickhouse-connect: `chdb://` (embedded, in-process) or `http(s)://` (a server)."""

from .connect import apply_retention, connect_store, migrate

__all__ = ["apply_retention", "connect_store", "migrate"]
