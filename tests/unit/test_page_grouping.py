"""Storms, rate limits and silences in the paging policy: a storm's first page goes at once and the rest of its
group is one batch page; a bundle resolves once all its incidents have; what a sink's rate limit holds back goes
out as one summary page through real HTTP, never dropped; silenced pages are recorded, not sent, and what still
fires when the silence ends is paged then."""

import json
import sqlite3
import time
from datetime import datetime, timedelta, timezone

import pytest

from tests.paging_fakes import Clock, Hook
from tests.recording_server import RecordingServer
from trainwire.consumers.alerting.dispatcher import Dispatcher
from trainwire.consumers.alerting.outbox import Outbox
from trainwire.consumers.alerting.paging import Pager
from trainwire.consumers.alerting.sinks import build_sinks
from trainwire.infra.alerting_settings import AlertingSettings, SinkSettings
from trainwire.infra.store.silences import Silence
from trainwire.schemas import Alert

WAIT = 10.0


def nan(run: str, experiment="shard", state="firing", step=7) -> Alert:
    return Alert(run_id=run, experiment=experiment, rule="loss_not_finite", severity="block", state=state, step=step,
                 message="train loss is nan", dedup_key=f"{run}/loss_not_finite/{step}")


def pages(path) -> list[tuple[str, str, int, float, str]]:
    """(page key, state, rows, when due, statuses) of every page recorded to be sent, oldest first."""
    with sqlite3.connect(path) as conn:
        return conn.execute(
            "SELECT CASE page WHEN '' THEN dedup_key ELSE page END, state, count(*), max(next_attempt_at), "
            "group_concat(DISTINCT status) FROM outbox WHERE status IN ('pending', 'waiting', 'delivered') "
            "GROUP BY 1, 2 ORDER BY min(enqueued_at), 2").fetchall()


@pytest.fixture
def clock():
    return Clock()


def test_a_storm_is_its_first_page_at_once_and_one_batch_per_wait_resolved_when_all_of_it_is(tmp_path, clock):
    path = tmp_path / "outbox.db"
    pager = Pager(Outbox(path), AlertingSettings(group_wait_seconds=10, group_by=("experiment",)), clock)
    start = clock.now
    for i in range(20):  # 20 runs of one experiment within 3.8 s, and one run of another
        pager.record([nan(f"run-{i:02}")], [Hook()])
        clock.now += 0.2
    lonely_at = clock.now
    pager.record([nan("lonely", experiment="other")], [Hook()])
    clock.now = start + 12  # after the first batch went: the next batch waits for the one after
    pager.record([nan("late")], [Hook()])
    batch = f"group/loss_not_finite/experiment=shard/{int((start + 10) * 1000)}"
    assert pages(path) == [("run-00/loss_not_finite/7", "firing", 1, start, "pending"),
                           (batch, "firing", 19, start + 10, "pending"),
                           ("lonely/loss_not_finite/7", "firing", 1, lonely_at, "pending"),
                           (f"group/loss_not_finite/experiment=shard/{int((start + 20) * 1000)}", "firing", 1,
                            start + 20, "pending")]
    for i in range(1, 19):  # all but one of the batch resolve: the batch's resolution waits for the last
        pager.record([nan(f"run-{i:02}", state="resolved")], [Hook()])
    assert [p for p in pages(path) if p[1] == "resolved"] == [(batch, "resolved", 18, start + 12 + 5, "waiting")]
    clock.now += 30
    pager.record([nan("run-19", state="resolved")], [Hook()])
    assert [p for p in pages(path) if p[1] == "resolved"] == [(batch, "resolved", 19, clock.now + 5, "pending")]
    pager.outbox.close()


def test_a_run_already_paged_in_its_group_is_paged_on_its_own_and_no_grouping_when_wait_is_zero(tmp_path, clock):
    pager = Pager(Outbox(tmp_path / "a.db"), AlertingSettings(group_wait_seconds=10), clock)
    pager.record([nan("run-1", step=1), nan("run-2")], [Hook()])
    pager.record([nan("run-1", step=1, state="resolved")], [Hook()])
    clock.now += 6  # the hold passed: run-1's next incident is a new one, in the group's time
    pager.record([nan("run-1", step=9)], [Hook()])
    assert sorted((k, n) for k, s, n, *_ in pages(tmp_path / "a.db") if s == "firing") == [
        (f"group/loss_not_finite/experiment=shard/{int((clock.now - 6 + 10) * 1000)}", 1),
        ("run-1/loss_not_finite/1", 1), ("run-1/loss_not_finite/9", 1)]
    ungrouped = Pager(Outbox(tmp_path / "b.db"), AlertingSettings(group_wait_seconds=0), clock)
    ungrouped.record([nan(f"run-{i}") for i in range(5)], [Hook()])
    assert len(pages(tmp_path / "b.db")) == 5
    pager.outbox.close()
    ungrouped.outbox.close()


def delivered_long_ago(path, count: int, seconds_ago: float) -> None:
    """`count` firing pages the sink sent `seconds_ago`."""
    at = time.time() - seconds_ago
    alerts = [nan(f"earlier-{i}", experiment=f"e{i}") for i in range(count)]
    with sqlite3.connect(path) as conn:
        conn.executemany("INSERT INTO outbox (sink, dedup_key, state, alert, enqueued_at, next_attempt_at, status, "
                         "delivered_at) VALUES ('webhook', ?, 'firing', ?, ?, ?, 'delivered', ?)",
                         [(a.dedup_key, a.model_dump_json(), at, at, at) for a in alerts])


def test_what_the_rate_limit_holds_back_goes_out_as_one_summary_once_the_minute_allows(tmp_path):
    with RecordingServer() as server:
        settings = AlertingSettings(sinks=[SinkSettings(kind="webhook", url=server.url, rate_limit_per_minute=3)],
                                    group_wait_seconds=0, resolve_hold_seconds=0)
        sinks = build_sinks(settings)
        outbox = Outbox(tmp_path / "outbox.db")
        delivered_long_ago(outbox.path, 3, seconds_ago=58.5)  # the limit is reached until 1.5 s from now
        pager = Pager(outbox, settings)
        dispatcher = Dispatcher(sinks, outbox, settings).start()
        try:
            held = [nan(f"run-{i}", experiment=f"exp-{i}") for i in range(4)]
            pager.record(held, sinks)
            dispatcher.wake(["webhook"])
            time.sleep(0.8)
            assert server.received == [], "over the limit: nothing yet"
            [summary] = server.wait_for(1, WAIT)
            assert summary["page"] == "rate_limited" and summary["count"] == 4
            assert summary["runs"] == [f"run-{i}" for i in range(4)]
            assert "held back by the rate limit" in summary["summary"]
            pager.record([a.model_copy(update={"state": "resolved"}) for a in held], sinks)
            dispatcher.wake(["webhook"])
            [_, resolved] = server.wait_for(2, WAIT)
            assert resolved["state"] == "resolved" and resolved["dedup_key"] == summary["dedup_key"]
            time.sleep(0.5)
            assert len(server.received) == 2
            [row] = outbox.summary()
            assert row["delivered"] == 3 + 8 and row["pending"] == 0, "nothing dropped"
        finally:
            dispatcher.stop()
            outbox.close()


def silence(clock: Clock, seconds: float, **matchers) -> Silence:
    now = datetime.fromtimestamp(clock.now, timezone.utc)
    return Silence(silence_id="sil-1", starts_at=now, ends_at=now + timedelta(seconds=seconds), created_at=now,
                   updated_at=now, reason="node drain", **matchers)


def statuses(path) -> dict[tuple[str, str], tuple[str, str]]:
    with sqlite3.connect(path) as conn:
        return {(k, s): (st, p) for k, s, st, p in conn.execute("SELECT dedup_key, state, status, page FROM outbox")}


def test_silenced_pages_are_recorded_not_sent_and_what_still_fires_is_paged_when_the_silence_ends(tmp_path, clock):
    path = tmp_path / "outbox.db"
    pager = Pager(Outbox(path), AlertingSettings(group_wait_seconds=0), clock)
    quiet = silence(clock, 60, experiment="shard")
    pager.record([nan("a"), nan("b"), nan("c"), nan("d", experiment="other")], [Hook()], [quiet])
    pager.record([nan("c", state="resolved")], [Hook()], [quiet])
    assert statuses(path) == {
        ("a/loss_not_finite/7", "firing"): ("silenced", "silence:sil-1"),
        ("b/loss_not_finite/7", "firing"): ("silenced", "silence:sil-1"),
        ("c/loss_not_finite/7", "firing"): ("silenced", "silence:sil-1"),
        ("c/loss_not_finite/7", "resolved"): ("silenced", "silence:sil-1"),
        ("d/loss_not_finite/7", "firing"): ("pending", "")}
    assert pager.release_silenced([quiet]) == 0, "still active"
    clock.now += 61
    assert pager.release_silenced([quiet]) == 2
    released = {key: value for key, value in statuses(path).items() if key[0][0] in "ab"}
    assert set(released.values()) == {("pending", "silence-ended/sil-1")}, "a and b as one page; c had resolved"
    assert pager.release_silenced([]) == 0
    pager.record([nan("a", state="resolved"), nan("b", state="resolved")], [Hook()])
    assert [p for p in pages(path) if p[1] == "resolved"][0][:3] == ("silence-ended/sil-1", "resolved", 2)
    with sqlite3.connect(path) as conn:
        [kind] = {k for (k,) in conn.execute("SELECT kind FROM outbox WHERE page = 'silence-ended/sil-1'")}
    assert kind == "silence_ended"
    pager.outbox.close()


def test_a_silence_matches_only_what_it_names():
    now = datetime.now(timezone.utc)
    s = Silence(silence_id="s", starts_at=now, ends_at=now + timedelta(hours=1), created_at=now, updated_at=now,
                run_id="r1", rule="loss_spike")
    assert s.matches("r1", "any", "loss_spike", "h") and not s.matches("r1", "any", "grad_norm_high", "h")
    assert not s.matches("r2", "any", "loss_spike", "h") and not s.covers_run("r1", "any", "h")
    host = Silence(silence_id="h", starts_at=now, ends_at=now + timedelta(hours=1), created_at=now,
                   updated_at=now, host="node-7")
    assert host.covers_run("r9", "e", "node-7") and not host.matches("r9", "e", "x", "node-8")
    assert host.active(now) and not host.active(now + timedelta(hours=1)) and host.status(now) == "active"
    assert json.loads(json.dumps(host.to_dict(now)))["matchers"] == "host=node-7"
