"""The outbox's leases: a page held by a process that died is taken over at once, a live holder is never overtaken,
a holder that cannot be checked is overtaken only once it stops renewing its lease, and a page recorded as
delivered is never claimed again."""

import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from tests.recording_server import RecordingServer
from trainwire.consumers.alerting import holders
from trainwire.consumers.alerting.dispatcher import Dispatcher
from trainwire.consumers.alerting.outbox import Outbox
from trainwire.consumers.alerting.sinks import build_sinks
from trainwire.infra.alerting_settings import AlertingSettings, SinkSettings
from trainwire.schemas import Alert

KEY = "run-1/loss_not_finite/5"


def alert(state="firing") -> Alert:
    return Alert(run_id="run-1", experiment="llama-sft", rule="loss_not_finite", severity="block", state=state,
                 step=5, message="train loss is nan at step 5", dedup_key=KEY)


@pytest.fixture
def path(tmp_path):
    outbox = Outbox(tmp_path / "outbox.db")
    outbox.enqueue([("webhook", alert())])
    outbox.close()
    return tmp_path / "outbox.db"


def lease_of(path) -> tuple[str, float]:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT holder, lease_until FROM outbox WHERE dedup_key = ?", (KEY,)).fetchone()


def hold_in_another_process(path, lease_seconds: float) -> subprocess.Popen:
    """A process that claims the page and then hangs on to it, as one stuck sending it would."""
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from trainwire.consumers.alerting.outbox import Outbox
        outbox = Outbox(Path({str(path)!r}), lease_seconds={lease_seconds})
        assert outbox.claim("webhook") is not None
        print("claimed", flush=True)
        time.sleep(120)
    """)
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "claimed"
    return holder


def claim_within(outbox, seconds: float):
    deadline = time.monotonic() + seconds
    while (delivery := outbox.claim("webhook")) is None and time.monotonic() < deadline:
        time.sleep(0.02)
    return delivery


def test_a_page_held_by_a_live_process_is_never_overtaken_and_is_taken_over_as_soon_as_it_dies(path):
    holder = hold_in_another_process(path, lease_seconds=0.2)
    successor = Outbox(path, lease_seconds=0.2)
    try:
        time.sleep(1.0)  # many lease lengths: it is alive, so it keeps the page
        assert successor.claim("webhook") is None
        holder.kill()  # not reaped yet: a zombie holds nothing either
        started = time.monotonic()
        delivery = claim_within(successor, 2.0)
        assert delivery is not None and time.monotonic() - started < 1.0
        assert delivery.alert.dedup_key == KEY
        assert delivery.unsettled_attempt_by.split("|")[1] == str(holder.pid)  # it may have been sent
    finally:
        holder.kill()
        holder.wait()
        successor.close()


def test_a_holder_this_machine_cannot_check_is_overtaken_only_once_its_lease_ran_out(path):
    elsewhere = "other-host:boot:pid:[1]|4242|1234|cafe"
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE outbox SET holder = ?, lease_until = ?", (elsewhere, time.time() + 0.6))
    outbox = Outbox(path)
    try:
        assert holders.is_alive(elsewhere) is None
        assert outbox.claim("webhook") is None
        delivery = claim_within(outbox, 2.0)
        assert delivery is not None and delivery.unsettled_attempt_by == elsewhere
    finally:
        outbox.close()


def test_a_live_holder_renews_its_lease_while_it_sends(path):
    outbox = Outbox(path, lease_seconds=0.4)
    try:
        outbox.claim("webhook")
        time.sleep(1.2)
        holder, lease_until = lease_of(path)
        assert holder == outbox.holder and lease_until > time.time()
    finally:
        outbox.close()


def test_another_open_outbox_of_this_process_is_not_overtaken_and_closing_releases_its_page(path):
    first, second = Outbox(path, lease_seconds=0.2), Outbox(path, lease_seconds=0.2)
    try:
        assert first.claim("webhook") is not None
        time.sleep(0.5)
        assert second.claim("webhook") is None
        first.close()  # stopped before it recorded the outcome: the page is free, and marked as maybe sent
        delivery = second.claim("webhook")
        assert delivery is not None and delivery.unsettled_attempt_by.endswith(first.holder)
    finally:
        second.close()


def test_recording_the_outcome_releases_the_page_and_a_delivered_page_is_never_claimed_again(path):
    outbox = Outbox(path)
    try:
        delivery = outbox.claim("webhook")
        assert delivery.unsettled_attempt_by == ""  # never sent before
        outbox.delivered(delivery)
        assert lease_of(path) == ("", 0)
        assert outbox.claim("webhook") is None
        assert outbox.enqueue([("webhook", alert())]) == 0
    finally:
        outbox.close()
    successor = Outbox(path)
    try:
        assert successor.claim("webhook") is None
    finally:
        successor.close()


def test_a_failure_recorded_by_a_holder_that_lost_the_page_leaves_it_to_its_new_holder(path):
    stale = Outbox(path)
    delivery = stale.claim("webhook")
    with sqlite3.connect(path) as conn:  # taken over while stale was stuck (its lease ran out elsewhere)
        conn.execute("UPDATE outbox SET holder = 'other-host:b:n|7|7|new', lease_until = ?", (time.time() + 60,))
    try:
        stale.retry_at(delivery, time.time(), "HTTP 503")
        assert lease_of(path)[0] == "other-host:b:n|7|7|new"
    finally:
        stale.close()


def test_a_dead_pid_or_a_reused_one_is_not_alive():
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert holders.is_alive(f"{holders.THIS_MACHINE}|{gone.pid}||x") is False
    parent = holders.process_start(subprocess.os.getppid())
    assert holders.is_alive(f"{holders.THIS_MACHINE}|{subprocess.os.getppid()}|{parent}|x") is True
    assert holders.is_alive(f"{holders.THIS_MACHINE}|{subprocess.os.getppid()}|{parent}0|x") is False


def test_an_outbox_written_before_holders_were_recorded_opens_and_pages(tmp_path):
    path = tmp_path / "outbox.db"
    with sqlite3.connect(path) as conn:
        conn.executescript("""
            CREATE TABLE outbox (sink TEXT NOT NULL, dedup_key TEXT NOT NULL, state TEXT NOT NULL,
                alert TEXT NOT NULL, enqueued_at REAL NOT NULL, status TEXT NOT NULL DEFAULT 'pending',
                attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL NOT NULL,
                lease_until REAL NOT NULL DEFAULT 0, last_error TEXT NOT NULL DEFAULT '', delivered_at REAL,
                PRIMARY KEY (sink, dedup_key, state)) WITHOUT ROWID;""")
        conn.execute("INSERT INTO outbox (sink, dedup_key, state, alert, enqueued_at, next_attempt_at) "
                     "VALUES ('webhook', ?, 'firing', ?, 0, 0)", (KEY, alert().model_dump_json()))
    outbox = Outbox(path)
    try:
        delivery = outbox.claim("webhook")
        assert delivery is not None and delivery.alert.dedup_key == KEY
    finally:
        outbox.close()


class RecordingFailsOnce(Outbox):
    """The outbox of a disk that is full for a moment: the first delivery cannot be recorded."""

    failures = 1

    def delivered(self, delivery):
        if self.failures:
            self.failures -= 1
            raise sqlite3.OperationalError("database or disk is full")
        super().delivered(delivery)


def test_a_page_delivered_but_not_recorded_is_recorded_later_not_sent_again(tmp_path):
    with RecordingServer() as server:
        [webhook] = build_sinks(AlertingSettings(sinks=[SinkSettings(kind="webhook", url=server.url)]))
        outbox = RecordingFailsOnce(tmp_path / "outbox.db")
        dispatcher = Dispatcher([webhook], outbox, AlertingSettings(sinks=[webhook.settings])).start()
        try:
            outbox.enqueue([("webhook", alert())])
            dispatcher.wake(["webhook"])
            deadline = time.monotonic() + 10
            while outbox.summary()[0]["delivered"] != 1:
                assert time.monotonic() < deadline, outbox.summary()
                time.sleep(0.05)
            time.sleep(0.3)
            assert len(server.received) == 1
        finally:
            dispatcher.stop()
            outbox.close()
