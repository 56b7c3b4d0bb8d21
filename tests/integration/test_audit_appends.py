"""Appends serialised across processes: the store takes one entry per seq (appenders on different hosts, one
server), and the home's file lock (processes sharing a home).

chdb serves one process per data directory, so appenders that share no lock are threads here, each with its own
client and its own lock, as processes on separate hosts would be; the file lock is taken by real subprocesses.
"""

import subprocess
import sys
import threading
import time
from pathlib import Path

from trainwire.infra.store import connect_store
from trainwire.infra.store.audit_anchor import latest_anchor
from trainwire.infra.store import audit_chain
from trainwire.infra.store.audit_chain import Appender, append_entry, read_entries, verify_log
from trainwire.infra.store.audit_config import config_for, store_identity
from trainwire.infra.store.audit_lock import AppendLock

APPENDERS, EACH = 4, 5


def test_appenders_sharing_no_lock_never_take_the_same_seq(client, tmp_path):
    dsn = f"chdb://{tmp_path / 'chdb'}"
    append_entry(client, "alice", "audit.viewed", "", {})  # one entry before they start
    start, failures = threading.Barrier(APPENDERS), []

    def appender(number: int) -> None:
        own_client = connect_store(dsn)
        own = Appender(lock=AppendLock(), file_lock=False)  # as if a process on another host
        try:
            start.wait()
            for i in range(EACH):
                own.append(own_client, f"host{number}", "audit.viewed", "", {"i": i})
        except Exception as err:  # noqa: BLE001 - reported below
            failures.append(err)
        finally:
            own_client.close()

    threads = [threading.Thread(target=appender, args=(n,)) for n in range(APPENDERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures
    entries = read_entries(client)
    assert [e.seq for e in entries] == list(range(1 + APPENDERS * EACH))
    config = config_for(client)
    anchored = latest_anchor(config.anchor_path, store_identity(client))
    assert anchored["seq"] == APPENDERS * EACH
    verification = verify_log(entries, config.trusted_keys(), {"file": anchored})
    assert verification.ok, verification.problems


def test_an_appender_that_read_a_stale_head_loses_the_seq_and_appends_after_the_winner(client, monkeypatch):
    append_entry(client, "alice", "audit.viewed", "", {})
    stale = audit_chain._head(client)
    append_entry(client, "bob", "audit.viewed", "", {})  # another host, between carol's read and her insert
    reads, read_head = iter([stale]), audit_chain._head
    monkeypatch.setattr(audit_chain, "_head", lambda c: next(reads, None) or read_head(c))

    assert append_entry(client, "carol", "audit.viewed", "", {}).seq == 2
    entries = read_entries(client)
    assert [(e.seq, e.actor) for e in entries] == [(0, "alice"), (1, "bob"), (2, "carol")]
    assert verify_log(entries, config_for(client).trusted_keys(), {}).ok


LOCKED_INCREMENT = """
import os, sys, time
from pathlib import Path
from trainwire.infra.store.audit_lock import AppendLock
counter, lock_file, use_lock = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "lock"
lock = AppendLock()
counter.with_name(f"ready-{os.getpid()}").touch()
while not counter.with_name("go").exists():  # all start together, not one after another's start-up
    time.sleep(0.01)
for _ in range(int(sys.argv[4])):
    with lock:
        if use_lock:
            lock.hold_file(lock_file)
        value = int(counter.read_text())
        time.sleep(0.002)  # read, think, write: the window another process would slip into
        written = counter.with_name(f"{counter.name}.{os.getpid()}")
        written.write_text(str(value + 1))
        os.replace(written, counter)  # whole or not at all: a reader never sees a half-written number
"""


def _increments(tmp_path: Path, mode: str, processes: int = 4, each: int = 25) -> int:
    directory = tmp_path / mode
    directory.mkdir()
    counter = directory / "counter"
    counter.write_text("0")
    children = [subprocess.Popen([sys.executable, "-c", LOCKED_INCREMENT, str(counter), str(tmp_path / "audit.lock"),
                                  mode, str(each)]) for _ in range(processes)]
    deadline = time.monotonic() + 60
    while len(list(directory.glob("ready-*"))) < processes and time.monotonic() < deadline:
        time.sleep(0.01)
    (directory / "go").touch()
    assert [child.wait(120) for child in children] == [0] * processes
    return int(counter.read_text())


def test_the_home_file_lock_serialises_processes(tmp_path):
    assert _increments(tmp_path, "lock") == 100
    assert _increments(tmp_path, "nolock") < 100  # the same race without the lock loses updates


HOLD_THE_HOME_LOCK = """
import fcntl, os, sys, time
descriptor = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(descriptor, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_append_entry_waits_for_another_process_holding_the_home_lock(client, tmp_path):
    append_entry(client, "alice", "audit.viewed", "", {})  # the home's key exists: its making is not timed
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_HOME_LOCK, str(tmp_path / "audit.lock"), "1.5"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    started = time.monotonic()
    append_entry(client, "bob", "audit.viewed", "", {})
    assert time.monotonic() - started > 1.0
    assert holder.wait(30) == 0


TRY_THE_HOME_LOCK = """
import fcntl, os, sys
descriptor = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
try:
    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    sys.exit(1)
"""


def test_a_configured_process_holds_its_home_lock_for_a_whole_operation(tmp_path):
    """A registry transition reads, checks, then appends under `with append_lock:`: another process sharing the
    home must not append between its reads and its entry."""
    from trainwire.infra.config import Settings
    from trainwire.infra.store.audit_lock import append_lock
    from trainwire.infra.store.audit_config import configure_audit

    lock_file = configure_audit(Settings(home=tmp_path / "home")).lock_path
    try:
        with append_lock:  # nothing appended yet
            assert subprocess.run([sys.executable, "-c", TRY_THE_HOME_LOCK, str(lock_file)]).returncode == 1
        assert subprocess.run([sys.executable, "-c", TRY_THE_HOME_LOCK, str(lock_file)]).returncode == 0
    finally:
        append_lock.home_file = None
