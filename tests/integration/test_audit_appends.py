"""Appends serialised across processes: the store-level claim (appenders on different hosts, one server) and the
home's file lock (processes sharing a home).

chdb serves one process per data directory, so appenders that share no lock are threads here, each with its own
client and its own lock, as separate processes would be; the file lock is taken by real subprocesses.
"""

import subprocess
import sys
import threading
import time
from pathlib import Path

from trainwire.infra.store import connect_store
from trainwire.infra.store.audit_anchor import latest_anchor
from trainwire.infra.store.audit_chain import Appender, append_entry, read_entries, verify_log
from trainwire.infra.store.audit_claims import AppendLock, claim
from trainwire.infra.store.audit_config import config_for, store_identity

APPENDERS, EACH = 4, 5


def test_appenders_sharing_no_lock_never_take_the_same_seq(client, tmp_path):
    dsn = f"chdb://{tmp_path / 'chdb'}"
    append_entry(client, "alice", "audit.viewed", "", {})  # one entry before they start
    start, failures = threading.Barrier(APPENDERS), []

    def appender(number: int) -> None:
        own_client = connect_store(dsn)
        own = Appender(lock=AppendLock(), file_lock=False, claims=True)  # as if another process on another host
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


def test_one_claimant_of_a_seq_wins_and_a_stale_claim_no_longer_counts(client):
    assert claim(client, 7, "first") is True
    assert claim(client, 7, "second") is False
    assert claim(client, 7, "first") is True  # the winner asking again is still the winner
    client.command("INSERT INTO audit_claims (seq, claimant, claimed_at) VALUES (8, 'dead', now64(9) - 60)")
    assert claim(client, 8, "alive") is True


LOCKED_INCREMENT = """
import os, sys, time
from pathlib import Path
from trainwire.infra.store.audit_claims import AppendLock
counter, lock_file, use_lock = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "lock"
lock = AppendLock()
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
    counter = tmp_path / f"counter-{mode}"
    counter.write_text("0")
    children = [subprocess.Popen([sys.executable, "-c", LOCKED_INCREMENT, str(counter), str(tmp_path / "audit.lock"),
                                  mode, str(each)]) for _ in range(processes)]
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
