"""Flap suppression in the paging policy, on a clock of the test's own: what the outbox will send (a row per sink,
grouped into pages) for a run and rule that fires and resolves again and again, fast or slow; the policy's state
lives in the outbox file, so a restarted consumer carries on; an alert read twice changes nothing."""

import json
import sqlite3

import pytest

from tests.paging_fakes import Clock, Hook
from trainwire.consumers.alerting.outbox import Outbox
from trainwire.consumers.alerting.paging import Pager
from trainwire.infra.alerting_settings import AlertingSettings
from trainwire.schemas import Alert

HOLD, SETTLE, WINDOW, K = 5.0, 60.0, 1800.0, 3


@pytest.fixture
def clock():
    return Clock()


def pager(path, clock) -> Pager:
    settings = AlertingSettings(resolve_hold_seconds=HOLD, flap_threshold=K, flap_window_seconds=WINDOW,
                                flap_settle_seconds=SETTLE, group_wait_seconds=0)
    return Pager(Outbox(path), settings, clock)


def crossing(step: int, state: str, run="run-1", rule="loss_spike") -> Alert:
    return Alert(run_id=run, experiment="sft", rule=rule, severity="critical", state=state, step=step,
                 message=f"{state} at step {step}", dedup_key=f"{run}/{rule}/{step}")


def cycle(p: Pager, clock: Clock, step: int, gap: float) -> None:
    """Fire at `step`, resolve a second later, then `gap` seconds go by."""
    p.record([crossing(step, "firing")], [Hook()])
    clock.now += 1
    p.record([crossing(step, "resolved")], [Hook()])
    clock.now += gap


def pages(path) -> list[tuple[str, str, float, str]]:
    """(page key, state, when due, message) of every page the outbox will send, in the order they were recorded."""
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT CASE page WHEN '' THEN dedup_key ELSE page END, state, max(next_attempt_at), "
                            "min(alert), min(enqueued_at) FROM outbox WHERE status IN ('pending', 'delivered', "
                            "'failed') GROUP BY 1, 2 ORDER BY 5, 2").fetchall()
    return [(key, state, due, json.loads(alert)["message"]) for key, state, due, alert, _ in rows]


def test_fast_flapping_is_one_page_and_one_resolution_held_until_it_settles(tmp_path, clock):
    p = pager(tmp_path / "outbox.db", clock)
    started = clock.now
    for step in range(1, 7):  # six crossings, each within the hold of the last
        cycle(p, clock, step * 10, gap=1)
    last_resolved = clock.now - 1
    [(key, state, due, _), (rkey, rstate, rdue, message)] = pages(tmp_path / "outbox.db")
    assert (key, state, due) == ("run-1/loss_spike/10", "firing", started)
    assert (rkey, rstate) == (key, "resolved")
    assert rdue == last_resolved + SETTLE, "a flapping incident resolves once it stayed clear for the settle period"
    assert message.startswith("settled after flapping: 12 transitions")
    p.outbox.close()


def test_an_incident_that_fires_again_within_the_hold_is_one_page(tmp_path, clock):
    p = pager(tmp_path / "outbox.db", clock)
    cycle(p, clock, 10, gap=2)
    cycle(p, clock, 20, gap=HOLD + 1)  # within the hold: the same page; then clear for longer than the hold
    cycle(p, clock, 30, gap=1)  # a new incident
    keys = [(key, state) for key, state, *_ in pages(tmp_path / "outbox.db")]
    assert keys == [("run-1/loss_spike/10", "firing"), ("run-1/loss_spike/10", "resolved"),
                    ("run-1/loss_spike/30", "firing"), ("run-1/loss_spike/30", "resolved")]
    p.outbox.close()


def test_slow_flapping_pages_up_to_the_threshold_then_once_as_flapping_across_a_restart(tmp_path, clock):
    path = tmp_path / "outbox.db"
    p = pager(path, clock)
    for step in (10, 20, 30):  # each clear for longer than the hold: three incidents, each paged and resolved
        cycle(p, clock, step, gap=HOLD + 10)
    p.outbox.close()
    p = pager(path, clock)  # the consumer restarted: what it counted is in the outbox file
    cycle(p, clock, 40, gap=HOLD + 10)  # the fourth within the window: flapping
    for step in (50, 60, 70):  # crossings while flapping, each within the settle period of the last
        cycle(p, clock, step, gap=HOLD + 10)
    sent = pages(path)
    assert [(k, s) for k, s, *_ in sent[:6]] == [(f"run-1/loss_spike/{n}", s) for n in (10, 20, 30)
                                                for s in ("firing", "resolved")]
    assert [(k, s) for k, s, *_ in sent[6:]] == [("run-1/loss_spike/flapping@40", "firing"),
                                                 ("run-1/loss_spike/flapping@40", "resolved")]
    assert sent[6][3].startswith("flapping: 7 transitions in the last 30 min")
    assert sent[7][2] == clock.now - HOLD - 10 + SETTLE and "14 transitions" in sent[7][3]
    with sqlite3.connect(path) as conn:
        statuses = dict(conn.execute("SELECT status, count(*) FROM outbox GROUP BY status").fetchall())
    assert statuses == {"pending": 8, "merged": 8}, "every crossing is recorded, 8 of them sent"
    p.outbox.close()


def test_an_alert_read_again_changes_nothing(tmp_path, clock):
    p = pager(tmp_path / "outbox.db", clock)
    alerts = [crossing(step, state) for step in (10, 20) for state in ("firing", "resolved")]
    assert p.record(alerts, [Hook()]) == 4
    before = pages(tmp_path / "outbox.db")
    clock.now += 100
    assert p.record(alerts, [Hook()]) == 0
    assert pages(tmp_path / "outbox.db") == before
    p.outbox.close()


def test_other_rules_and_runs_flap_on_their_own(tmp_path, clock):
    p = pager(tmp_path / "outbox.db", clock)
    for step in range(1, 5):
        for run, rule in (("run-1", "loss_spike"), ("run-2", "loss_spike"), ("run-1", "grad_norm_high")):
            p.record([crossing(step, "firing", run, rule)], [Hook()])
            p.record([crossing(step, "resolved", run, rule)], [Hook()])
        clock.now += HOLD + 1
    assert len([k for k, state, *_ in pages(tmp_path / "outbox.db") if "flapping" in k]) == 3 * 2
    p.outbox.close()
