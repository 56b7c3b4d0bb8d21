"""The schema rendered for a ClickHouse cluster: replicated local tables, Distributed tables, ON CLUSTER."""

import re

import pytest

from trainwire.infra.config import ConfigError, load_settings
from trainwire.infra.store import connect_store
from trainwire.infra.store.cluster import ClusterDDLError, render_statement
from trainwire.infra.store.connect import schema_ddl

SINGLE = schema_ddl()
CLUSTER = schema_ddl("prod")
TABLES = [re.match(r"CREATE TABLE IF NOT EXISTS (\w+)", s)[1] for s in SINGLE if s.startswith("CREATE TABLE")]
VIEWS = [s for s in CLUSTER if s.startswith("CREATE MATERIALIZED VIEW")]


def test_every_table_becomes_a_replicated_local_table_and_a_distributed_table_sharded_by_run():
    assert {"steps", "runs", "steps_1m", "gpu_1m", "dead_letters"} <= set(TABLES)
    for table in TABLES:
        (local,) = [s for s in CLUSTER if s.startswith(f"CREATE TABLE IF NOT EXISTS {table}_local ON CLUSTER prod (")]
        assert re.search(rf"ENGINE = Replicated\w*MergeTree\('/clickhouse/tables/{{shard}}/{{database}}/{table}_local', "
                         r"'\{replica\}'", local)
        (distributed,) = [s for s in CLUSTER if s.startswith(f"CREATE TABLE IF NOT EXISTS {table} ON CLUSTER prod AS")]
        key = distributed.rsplit(",", 1)[1]
        assert f"Distributed(prod, currentDatabase(), {table}_local" in distributed
        assert "run_id" in key or table in ("dead_letters", "dead_letter_replays", "schema_migrations", "audit_log")


def test_views_read_and_write_each_shards_local_tables():
    assert len(VIEWS) == 7
    for view in VIEWS:
        assert re.search(r" ON CLUSTER prod TO \w+_local AS", view)
        assert all(name.endswith("_local") for name in re.findall(r"\bFROM (\w+)", view))


def test_schema_changes_reach_local_and_distributed_tables_and_nothing_runs_on_one_node_only():
    alters = [s for s in CLUSTER if s.startswith("ALTER TABLE")]
    assert any(s.startswith("ALTER TABLE run_started_local ON CLUSTER prod") for s in alters)
    assert any(s.startswith("ALTER TABLE run_started ON CLUSTER prod") for s in alters)  # columns mirrored
    ttl = render_statement("ALTER TABLE steps MODIFY TTL toDateTime(ts) + INTERVAL 30 DAY", "prod")
    assert ttl == ["ALTER TABLE steps_local ON CLUSTER prod MODIFY TTL toDateTime(ts) + INTERVAL 30 DAY"]
    assert all(" ON CLUSTER prod" in s for s in CLUSTER if not s.startswith("INSERT INTO"))


def test_the_single_server_schema_is_left_as_written():
    assert not any("ON CLUSTER" in s or "Distributed" in s or "Replicated" in s for s in SINGLE)


@pytest.fixture(scope="module")
def parser(tmp_path_factory):
    client = connect_store(f"chdb://{tmp_path_factory.mktemp('ddl') / 'chdb'}")
    yield client
    client.close()


def test_every_rendered_statement_is_valid_clickhouse_sql(parser):
    for statement in CLUSTER:
        parser.query(f"EXPLAIN AST {statement}")  # ClickHouse's own parser: raises on a syntax error


def test_unknown_shapes_and_bad_cluster_names_are_refused():
    with pytest.raises(ClusterDDLError, match="cannot render"):
        render_statement("DROP TABLE steps", "prod")
    with pytest.raises(ClusterDDLError, match="invalid cluster name"):
        render_statement("ALTER TABLE steps DELETE WHERE 1", "prod; DROP")


def test_a_cluster_needs_a_clickhouse_server(monkeypatch):
    monkeypatch.setenv("TRAINWIRE_STORE_CLUSTER", "prod")
    with pytest.raises(ConfigError, match="TRAINWIRE_STORE_CLUSTER.*http"):
        load_settings()
    monkeypatch.setenv("TRAINWIRE_STORE", "https://clickhouse.internal:8443")
    assert load_settings().store_cluster == "prod"
