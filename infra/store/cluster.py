"""The migrations rendered for a ClickHouse cluster: replicated local tables, Distributed tables over them.

For each table `t` of a migration the cluster gets
  * `t_local ON CLUSTER c`, the engine made replicated (`ReplacingMergeTree` → `ReplicatedReplacingMergeTree(
    '/clickhouse/tables/{shard}/{database}/t_local', '{replica}')`), holding each shard's rows;
  * `t ON CLUSTER c`, a `Distributed` table over `t_local`, sharded by run id — all of a run's rows live on one
    shard, so ReplacingMergeTree de-duplication, `FINAL` and the run-level rollups stay exact.
Materialized views are created on every node, read the local source table and write the local target, so each
shard keeps the rollups of its own runs. Everything else (ALTER, INSERT … SELECT) addresses the same names, so
the consumers and the read API use one set of table names on a single server and on a cluster.
"""

from __future__ import annotations

import re

# The audit log is one hash chain: it lives whole on one shard (a constant key), replicated like the rest. A dead
# letter's replays live with it.
SHARDING_KEYS = {"dead_letters": "cityHash64(topic, partition)", "dead_letter_replays": "cityHash64(topic, partition)",
                 "schema_migrations": "version", "audit_log": "0"}
DEFAULT_SHARDING_KEY = "cityHash64(run_id)"

_CREATE_TABLE = re.compile(r"^CREATE TABLE IF NOT EXISTS (?P<name>\w+)\s*\((?P<body>.*)\)\s*ENGINE\s*=\s*"
                           r"(?P<engine>\w*MergeTree)(?P<args>\([^)]*\))?(?P<rest>.*)$", re.S)
_CREATE_VIEW = re.compile(r"^CREATE MATERIALIZED VIEW IF NOT EXISTS (?P<name>\w+) TO (?P<target>\w+) AS"
                          r"(?P<select>.*)$", re.S)
_ALTER = re.compile(r"^ALTER TABLE (?P<name>\w+)(?P<rest>.*)$", re.S)
_FROM = re.compile(r"\bFROM (?P<table>\w+)\b")


class ClusterDDLError(ValueError):
    """A migration statement has a shape the cluster renderer does not know how to distribute."""


def local_name(table: str) -> str:
    return f"{table}_local"


def render_statement(statement: str, cluster: str) -> list[str]:
    """One statement of a single-server migration as the statements a cluster runs instead."""
    on = f"ON CLUSTER {_quote(cluster)}"
    if match := _CREATE_TABLE.match(statement):
        name, local = match["name"], local_name(match["name"])
        args = (match["args"] or "()")[1:-1].strip()
        replicated_args = f"'/clickhouse/tables/{{shard}}/{{database}}/{local}', '{{replica}}'"
        engine = f"Replicated{match['engine']}({replicated_args}{', ' + args if args else ''})"
        key = SHARDING_KEYS.get(name, DEFAULT_SHARDING_KEY)
        return [
            f"CREATE TABLE IF NOT EXISTS {local} {on} ({match['body']}) ENGINE = {engine}{match['rest']}",
            f"CREATE TABLE IF NOT EXISTS {name} {on} AS {local} "
            f"ENGINE = Distributed({_quote(cluster)}, currentDatabase(), {local}, {key})",
        ]
    if match := _CREATE_VIEW.match(statement):
        select = _FROM.sub(lambda m: f"FROM {local_name(m['table'])}", match["select"])
        return [f"CREATE MATERIALIZED VIEW IF NOT EXISTS {match['name']} {on} TO {local_name(match['target'])} AS"
                f"{select}"]
    if match := _ALTER.match(statement):
        rest = match["rest"]
        statements = [f"ALTER TABLE {local_name(match['name'])} {on}{rest}"]
        if re.search(r"\b(ADD|DROP|MODIFY|RENAME) COLUMN\b", rest):  # the Distributed table mirrors the columns
            statements.append(f"ALTER TABLE {match['name']} {on}{rest}")
        return statements
    if statement.startswith("INSERT INTO "):
        return [statement]  # through the Distributed tables: rows go back to their run's shard
    raise ClusterDDLError(f"cannot render for a cluster: {statement[:80]!r}")


def render(statements: list[str], cluster: str) -> list[str]:
    return [rendered for statement in statements for rendered in render_statement(statement, cluster)]


def _quote(identifier: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", identifier):
        raise ClusterDDLError(f"invalid cluster name {identifier!r}")
    return f"`{identifier}`" if "-" in identifier else identifier
