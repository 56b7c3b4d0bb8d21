"""ClickHouse, reached only through clickhouse-connect: `chdb://` (embedded, in-process) or `http(s)://` (a server)."""

from .connect import connect_store, migrate

__all__ = ["connect_store", "migrate"]
