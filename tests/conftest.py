"""Shared fixtures. Kafka tests use the real broker that infra/kafka/up starts (a failure in CI, never a skip)."""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from tests import embedded_stores
from tests.broker_lease import BrokerLease
from trainwire.infra.config import Settings

ROOT = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


# What the test harness itself reads (the broker, the browser and LLaMA-Factory's environment to use); every other
# TRAINWIRE_* variable is the user's.
HARNESS_VARIABLES = frozenset({"TRAINWIRE_TEST_KAFKA", "TRAINWIRE_KAFKA_CACHE", "TRAINWIRE_KAFKA_PORT",
                               "TRAINWIRE_CHROMIUM", "TRAINWIRE_TEST_LLAMAFACTORY_PYTHON"})


def users_settings(environ: Mapping[str, str]) -> list[str]:
    """The user's trainwire settings among `environ`'s names: TRAINWIRE_* in any case (pydantic-settings reads
    `trainwire_home` as TRAINWIRE_HOME), less what the harness reads."""
    return [name for name in environ
            if name.upper().startswith("TRAINWIRE_") and name.upper() not in HARNESS_VARIABLES]


# Tests never read a user's settings nor pass them on to the processes they start. They are removed here, as the
# session starts, not by a fixture: module-level code and fixtures of wider scope run before any function-scoped
# fixture, and a variable put back after each test would be there again between tests.
for _name in users_settings(os.environ):
    del os.environ[_name]

# The broker's jars and data stay where infra/kafka/up keeps them for the user; HOME itself is a stand-in (below).
os.environ.setdefault("TRAINWIRE_KAFKA_CACHE", str(Path.home() / ".cache/trainwire/kafka"))


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(reason)
    pytest.skip(reason)


def answers(port: int) -> bool:
    """Whether something on this machine accepts connections on `port`."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


# What became of a broker the tests started, said at the end of the session's report.
BROKER_NOTES: list[str] = []


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """Bootstrap address of a real broker: TRAINWIRE_TEST_KAFKA, or the one infra/kafka/up starts (idempotent).
    A broker that test sessions started is stopped by the last of them to end (tests/broker_lease.py); one that was
    running before is left running."""
    if os.environ.get("TRAINWIRE_TEST_KAFKA"):
        yield os.environ["TRAINWIRE_TEST_KAFKA"]
        return
    port = int(os.environ.get("TRAINWIRE_KAFKA_PORT", "9092"))
    lease = BrokerLease(Path(os.environ["TRAINWIRE_KAFKA_CACHE"]), port, ROOT / "infra/kafka/down")
    lease.take()
    try:
        was_running = answers(port)
        try:
            result = subprocess.run([str(ROOT / "infra/kafka/up")], capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as err:
            _unavailable(f"cannot start Kafka with infra/kafka/up: {err}")
        if result.returncode != 0:
            _unavailable(f"infra/kafka/up failed: {result.stderr[-2000:]}")
        if not was_running:
            lease.started_it()
        yield result.stdout.strip().splitlines()[-1]
    finally:
        if note := lease.release():
            BROKER_NOTES.append(note)


def pytest_collection_finish(session: pytest.Session) -> None:
    """What collection imported (torch, transformers, chdb: ~570k objects) lives until the session ends: frozen, the
    garbage collector no longer walks it, and the full collections below cost ms instead of ~0.45 s of CPU each."""
    gc.collect()
    gc.freeze()


def pytest_unconfigure(config: pytest.Config) -> None:
    gc.unfreeze()  # for the interpreter's last collection: frozen, torch's bindings report their objects leaked


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    if deployments := sys.modules.get("tests.integration.kafka_fixtures"):
        deployments.stop_those_no_later_test_needs(item.session, nextitem)


def pytest_terminal_summary(terminalreporter) -> None:
    for note in BROKER_NOTES:
        terminalreporter.write_line(f"tests/conftest.py: {note}")


@pytest.fixture
def local_settings(tmp_path: Path) -> Settings:
    """Embedded defaults in a private home: the SQLite local log and chdb."""
    return Settings(home=tmp_path / "home", batch_max_seconds=0.2)


@pytest.fixture
def kafka_settings(tmp_path: Path, kafka_bootstrap: str) -> Settings:
    """The real broker, with topics no other test uses, and chdb in a private home."""
    return Settings(home=tmp_path / "home", kafka=kafka_bootstrap, batch_max_seconds=0.2,
                    topic_prefix=f"test-{uuid.uuid4().hex[:10]}.")


@pytest.fixture
def client(tmp_path: Path):
    """A migrated embedded store (chdb) of the test's own, through clickhouse-connect."""
    from trainwire.infra.store import connect_store, migrate

    client = connect_store(f"chdb://{tmp_path / 'chdb'}")
    migrate(client)
    yield client
    client.close()  # chdb holds one data directory per process until its clients close


@pytest.fixture(params=["local", "kafka"])
def any_settings(request: pytest.FixtureRequest) -> Settings:
    """Each transport in turn: the test runs once on the local log and once on the real broker."""
    if request.param == "kafka":
        request.applymarker(pytest.mark.kafka)
    return request.getfixturevalue(f"{request.param}_settings")


@pytest.fixture(scope="session", autouse=True)
def stand_in_home(tmp_path_factory: pytest.TempPathFactory):
    """HOME is a directory of the session's own, for this process and every one it starts: a test that falls back
    to the default home (~/.trainwire) or to a user's dotfiles (~/.streamlit) cannot read or write the real ones,
    and one that made ~/.trainwire at all fails the session, naming what it left there."""
    real_home, home = os.environ.get("HOME"), tmp_path_factory.mktemp("home")
    os.environ["HOME"] = str(home)
    yield home
    if real_home is not None:
        os.environ["HOME"] = real_home
    left = sorted(str(p.relative_to(home)) for p in (home / ".trainwire").rglob("*"))
    assert not left, f"a test used the default home ~/.trainwire instead of its own: {left}"


@pytest.fixture(autouse=True)
def release_embedded_store():
    """chdb serves one data directory per process: collect what a test left so the next can open its own (only while a
    connection may be open: the objects the tests themselves imported or made are not frozen)."""
    yield
    if embedded_stores.may_hold_one():
        gc.collect()
