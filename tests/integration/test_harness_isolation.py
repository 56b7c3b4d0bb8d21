"""The suite leaves the world of the person running it as it found it: the TRAINWIRE_* settings exported in the shell
that starts pytest reach no test, no fixture of any scope and no process a test starts (so no test writes into the
user's home), and the Kafka broker a session started is stopped as the session ends (the last of several, see
tests/broker_lease.py) while one that was running before stays, and an embedded store a test left open is released
before the next test opens its own (tests/embedded_stores.py). Each case runs a pytest session of its own, as a
user would, and looks at what it left."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, answers

MARK = "the-users-own"  # in every value the "user" exports: no test or process of the suite may see it


def pytest_session(args: list[str], cwd: Path, **variables: str) -> subprocess.CompletedProcess:
    """pytest in a process of its own, with the repository's conftest; a broker only from infra/kafka/up."""
    inherited = {k: v for k, v in os.environ.items() if k != "TRAINWIRE_TEST_KAFKA"}
    env = {**inherited, "PYTHONPATH": str(ROOT), **variables}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def users_world(tmp_path: Path) -> dict[str, str]:
    """What a user may have exported: a home, a config file, a store; upper case and lower case, which
    pydantic-settings reads as well."""
    (tmp_path / f"{MARK}.toml").write_text(f'home = "{tmp_path / MARK / "config-home"}"\n')
    return {"TRAINWIRE_HOME": str(tmp_path / MARK / "home"), "trainwire_home": str(tmp_path / MARK / "lower-home"),
            "TRAINWIRE_CONFIG": str(tmp_path / f"{MARK}.toml"), "Trainwire_Store": f"chdb://{tmp_path / MARK}/store"}


PROBE = f'''
import os, subprocess, sys
import pytest

def leaked(environ):
    return sorted(name for name, value in environ.items() if "{MARK}" in value)

AT_IMPORT = leaked(os.environ)

@pytest.fixture(scope="module")
def seen_by_a_module_fixture():
    return leaked(os.environ)

def test_module_code_and_module_fixtures_see_none(seen_by_a_module_fixture):
    assert AT_IMPORT == [] and seen_by_a_module_fixture == []

def test_a_test_and_the_processes_it_starts_see_none():
    child = subprocess.run([sys.executable, "-c", "import os; print(sorted(os.environ.values()))"],
                           capture_output=True, text=True, check=True)
    assert leaked(os.environ) == [] and "{MARK}" not in child.stdout
'''


def test_no_test_fixture_or_started_process_sees_the_users_settings(tmp_path):
    (tmp_path / "test_probe.py").write_text(PROBE)
    session = pytest_session(["-p", "tests.conftest", "test_probe.py"], tmp_path, **users_world(tmp_path))
    assert session.returncode == 0 and "2 passed" in session.stdout, session.stdout + session.stderr


def test_the_alert_cli_test_writes_nothing_into_the_users_home(tmp_path):
    """It pages and fails a page in a home of its own; it once used the exported home's outbox instead, and then
    failed on every later run (and `trainwire alerts status` exited 1 on the user's real data)."""
    world = users_world(tmp_path)
    test = "tests/unit/test_alert_sinks.py::test_cli_sends_a_test_page_and_shows_delivery_status"
    for _ in range(2):
        session = pytest_session([test], ROOT, **world)
        assert session.returncode == 0 and "1 passed" in session.stdout, session.stdout + session.stderr
    assert not (tmp_path / MARK).exists()


BROKER_PROBE = """
def test_gets_a_broker(kafka_bootstrap):
    assert kafka_bootstrap
"""


def free_port_pair() -> int:
    """A port whose next is free too: infra/kafka/up puts the broker on one and its controller on the next."""
    for port in random.sample(range(20000, 30000, 2), 200):
        try:
            with socket.socket() as first, socket.socket() as second:
                first.bind(("127.0.0.1", port))
                second.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise AssertionError("no two free ports in a row between 20000 and 30000")


@pytest.mark.kafka
def test_a_session_stops_the_broker_it_started_and_leaves_the_users(tmp_path):
    port = free_port_pair()
    (tmp_path / "test_broker.py").write_text(BROKER_PROBE)
    env = {**os.environ, "TRAINWIRE_KAFKA_PORT": str(port)}
    cache = Path(env["TRAINWIRE_KAFKA_CACHE"])
    try:
        session = pytest_session(["-p", "tests.conftest", "test_broker.py"], tmp_path, TRAINWIRE_KAFKA_PORT=str(port))
        assert session.returncode == 0 and "1 passed" in session.stdout, session.stdout + session.stderr
        assert not answers(port), "the broker the session started is still running"
        assert f"stopped the Kafka broker the tests started on 127.0.0.1:{port}" in session.stdout

        subprocess.run([str(ROOT / "infra/kafka/up")], env=env, capture_output=True, timeout=600, check=True)
        session = pytest_session(["-p", "tests.conftest", "test_broker.py"], tmp_path, TRAINWIRE_KAFKA_PORT=str(port))
        assert session.returncode == 0 and "1 passed" in session.stdout, session.stdout + session.stderr
        assert answers(port), "the session stopped a broker the user had started"
    finally:
        subprocess.run([str(ROOT / "infra/kafka/down"), "--wipe"], env=env, capture_output=True, timeout=120)
        for left in cache.glob(f"*-{port}*"):  # its configuration, log and lease files
            if left.is_file():
                left.unlink()


STORE_PROBE = """
from trainwire.infra.store import connect_store

def left_open_in_a_cycle(path):
    client = connect_store(f"chdb://{path}")
    client.command("SELECT 1")
    client.itself = client  # never closed: only the garbage collector frees it

def opens_its_own(path):
    client = connect_store(f"chdb://{path}")
    assert client.command("SELECT 1") == 1
    client.close()

def test_leaves_the_first_store_open(tmp_path):
    left_open_in_a_cycle(tmp_path / "first")

def test_opens_the_second(tmp_path):
    opens_its_own(tmp_path / "second")

def test_leaves_the_third_store_open(tmp_path):
    left_open_in_a_cycle(tmp_path / "third")

def test_opens_the_fourth(tmp_path):
    opens_its_own(tmp_path / "fourth")
"""


def test_a_store_a_test_left_open_does_not_block_the_next_tests_store(tmp_path):
    """chdb holds one data directory per process: the suite collects what a test left, the first time it sees chdb
    and every time after while a connection is open (the second pair runs once the connections are watched)."""
    (tmp_path / "test_store.py").write_text(STORE_PROBE)
    session = pytest_session(["-p", "tests.conftest", "test_store.py"], tmp_path)
    assert session.returncode == 0 and "4 passed" in session.stdout, session.stdout + session.stderr
