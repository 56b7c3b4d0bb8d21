"""What on-call is sent for the alerts the consumer reads: the paging policy, recorded in the outbox as it decides.

Every alert read is recorded (a row per sink, as before); the policy decides whether a row is sent, when, and under
which page:
  * **Silences.** A firing alert an active silence matches is recorded `silenced`, for every sink that pages people.
    When the silence ends, its incidents still firing are paged then (one page if there are several).
  * **One incident per run and rule at a time.** Its resolution is held `resolve_hold_seconds`: firing again within
    the hold continues the same page (nothing is sent; the held resolution is called off).
  * **Flapping.** A run and rule that fired more than `flap_threshold` times within `flap_window_seconds` is
    flapping: its next incident is one page, "flapping: N transitions", that takes every crossing after it, and is
    resolved once the run and rule stayed clear for `flap_settle_seconds`. An incident that flaps while its page is
    open (firing again within the hold) is held that long too, and its resolution names the count.
  * **Storms.** Per sink, the first page of a rule for one `group_by` group goes at once; pages of other runs of the
    group that follow within `group_wait_seconds` are batched into one page listing them, sent `group_wait_seconds`
    after the one before, for as long as the group keeps firing.
The per-sink rate limit is applied as pages are sent (dispatcher.py). The stop switch is no page: it acts on every
block alert of an opted-in run, silenced or not.

The state (crossings seen, open incidents, groups) lives in the outbox's SQLite file and changes in the same
transaction as the rows, so a restarted consumer carries on where the last one stopped, and an alert read twice
changes nothing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone

from trainwire.infra.alerting_settings import AlertingSettings
from trainwire.infra.store.silences import Silence
from trainwire.schemas import Alert

from .outbox import KEEP_SECONDS, Outbox, settle_bundle_resolutions

_SCHEMA = """
CREATE TABLE IF NOT EXISTS crossings (
    run_id TEXT NOT NULL, rule TEXT NOT NULL, dedup_key TEXT NOT NULL, state TEXT NOT NULL, seen_at REAL NOT NULL,
    PRIMARY KEY (run_id, rule, dedup_key, state)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS crossings_seen ON crossings (seen_at);
CREATE TABLE IF NOT EXISTS incidents (
    run_id TEXT NOT NULL, rule TEXT NOT NULL, page_key TEXT NOT NULL, current_key TEXT NOT NULL,
    flapping INTEGER NOT NULL, clear_due REAL NOT NULL, opened_at REAL NOT NULL,
    PRIMARY KEY (run_id, rule)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS page_groups (
    sink TEXT NOT NULL, group_key TEXT NOT NULL, last_member_at REAL NOT NULL, last_page_at REAL NOT NULL,
    batch_key TEXT NOT NULL, runs TEXT NOT NULL,
    PRIMARY KEY (sink, group_key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS outbox_silenced ON outbox (page) WHERE status = 'silenced';
"""
_INSERT = ("INSERT OR IGNORE INTO outbox (sink, dedup_key, state, alert, enqueued_at, next_attempt_at, status, page, "
           "kind) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
SILENCE_PAGE = "silence:"  # the page of a row a silence holds
SILENCE_OVER = "silence-over:"  # …of one it held that resolved before the silence ended


def pages_people(sink) -> bool:
    return bool(getattr(sink, "pages_people", False))


def _ago(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:g} h"
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"


class Pager:
    def __init__(self, outbox: Outbox, settings: AlertingSettings, clock: Callable[[], float] = time.time):
        self.outbox = outbox
        self.settings = settings
        self._clock = clock
        self._added = 0
        with outbox.transaction() as conn:
            for statement in filter(str.strip, _SCHEMA.split(";")):
                conn.execute(statement)
        self.forget_old()

    # --- recording what was read ---------------------------------------------------------------------------------

    def record(self, alerts: list[Alert], sinks: list, silences: list[Silence] = (),
               hosts: Mapping[str, str] | None = None) -> int:
        """Record every alert for every sink whose route takes it, in one transaction; returns the rows added."""
        hosts = hosts or {}
        now = self._clock()
        moment = datetime.fromtimestamp(now, timezone.utc)
        active = [s for s in silences if s.active(moment)]
        self._added = 0
        with self.outbox.transaction() as conn:
            for alert in alerts:
                self._record(conn, alert, sinks, active, hosts.get(alert.run_id, ""), now)
        return self._added

    def _record(self, conn, alert: Alert, sinks: list, active: list[Silence], host: str, now: float) -> None:
        seen = conn.execute("INSERT OR IGNORE INTO crossings VALUES (?, ?, ?, ?, ?)",
                            (alert.run_id, alert.rule, alert.dedup_key, alert.state, now)).rowcount == 0
        if seen:  # read again (a redelivery, a replay): it was decided the first time
            return
        routed = [sink for sink in sinks if sink.accepts(alert)]
        for sink in routed:
            if not pages_people(sink):
                self._insert(conn, sink.name, alert, now, now)
        paging = [sink.name for sink in routed if pages_people(sink)]
        if alert.state == "firing":
            silence = next((s for s in active if s.matches(alert.run_id, alert.experiment, alert.rule, host)), None)
            self._firing(conn, alert, paging, silence, host, now)
        else:
            self._resolved(conn, alert, paging, now)

    def _insert(self, conn, sink: str, alert: Alert, now: float, due: float, status: str = "pending",
                page: str = "", kind: str = "") -> None:
        self._added += conn.execute(_INSERT, (sink, alert.dedup_key, alert.state, alert.model_dump_json(), now, due,
                                              status, page, kind)).rowcount

    def _firing(self, conn, alert: Alert, sinks: list[str], silence: Silence | None, host: str, now: float) -> None:
        if silence is not None:
            for sink in sinks:
                self._insert(conn, sink, alert, now, now, "silenced", SILENCE_PAGE + silence.silence_id)
            return
        incident = conn.execute("SELECT page_key, flapping, clear_due FROM incidents WHERE run_id = ? AND rule = ?",
                                (alert.run_id, alert.rule)).fetchone()
        fired = self._crossings(conn, alert, now, "firing")
        flapping = fired > self.settings.flap_threshold
        if incident is not None and incident[2] > now:  # cleared, its resolution held: this continues it
            page_key, was_flapping, _ = incident
            for sink in sinks:
                self._insert(conn, sink, alert, now, now, "merged", page_key)
            self._call_off_resolution(conn, page_key)
            conn.execute("UPDATE incidents SET current_key = ?, flapping = ?, clear_due = 0 WHERE run_id = ? "
                         "AND rule = ?", (alert.dedup_key, int(was_flapping or flapping), alert.run_id, alert.rule))
            return
        if incident is not None and incident[2] == 0:  # another incident while one is open: not the detectors' way,
            for sink in sinks:                          # so nothing is folded: it is paged on its own
                self._insert(conn, sink, alert, now, now)
            return
        page_alert, kind = alert, ""
        if flapping:
            page_alert, kind = self._flapping_page(conn, alert, now), "flapping"
            for sink in sinks:
                self._insert(conn, sink, alert, now, now, "merged", page_alert.dedup_key)
        for sink in sinks:
            page, due = self._place(conn, sink, page_alert, host, now)
            self._insert(conn, sink, page_alert, now, due, page=page, kind="group" if page else kind)
        conn.execute("INSERT OR REPLACE INTO incidents VALUES (?, ?, ?, ?, ?, 0, ?)",
                     (alert.run_id, alert.rule, page_alert.dedup_key, alert.dedup_key, int(flapping), now))

    def _crossings(self, conn, alert: Alert, now: float, state: str | None = None) -> int:
        return conn.execute(
            "SELECT count(*) FROM crossings WHERE run_id = ? AND rule = ? AND seen_at >= ? "
            "AND (? IS NULL OR state = ?)",
            (alert.run_id, alert.rule, now - self.settings.flap_window_seconds, state, state)).fetchone()[0]

    def _flapping_page(self, conn, alert: Alert, now: float) -> Alert:
        transitions = self._crossings(conn, alert, now)
        anchor = alert.dedup_key.rsplit("/", 1)[-1]
        return alert.model_copy(update={
            "dedup_key": f"{alert.run_id}/{alert.rule}/flapping@{anchor}",
            "message": f"flapping: {transitions} transitions in the last "
                       f"{_ago(self.settings.flap_window_seconds)} (latest: {alert.message})"})

    def _call_off_resolution(self, conn, page_key: str) -> None:
        held = conn.execute("SELECT sink, page FROM outbox WHERE dedup_key = ? AND state = 'resolved' "
                            "AND status IN ('pending', 'waiting') AND holder = ''", (page_key,)).fetchall()
        conn.execute("UPDATE outbox SET status = 'superseded' WHERE dedup_key = ? AND state = 'resolved' "
                     "AND status IN ('pending', 'waiting') AND holder = ''", (page_key,))
        for sink, page in held:
            settle_bundle_resolutions(conn, sink, page)

    def _place(self, conn, sink: str, alert: Alert, host: str, now: float) -> tuple[str, float]:
        """(bundle, when due) of a new page for `sink`: ("", now) for the first page of its group, a run already
        paged in it, or no grouping; else the group's batch, sent `group_wait_seconds` after its last page."""
        wait = self.settings.group_wait_seconds
        if wait <= 0:
            return "", now
        labels = {"experiment": alert.experiment, "team": alert.team, "host": host}
        key = "/".join([alert.rule, *(f"{name}={labels[name]}" for name in self.settings.group_by)])
        group = conn.execute("SELECT last_member_at, last_page_at, batch_key, runs FROM page_groups WHERE sink = ? "
                             "AND group_key = ?", (sink, key)).fetchone()
        if group is None or now - group[0] > wait:
            conn.execute("INSERT OR REPLACE INTO page_groups VALUES (?, ?, ?, ?, '', ?)",
                         (sink, key, now, now, json.dumps([alert.run_id])))
            return "", now
        last_member, last_page, batch, runs = group[0], group[1], group[2], json.loads(group[3])
        if alert.run_id in runs:
            return "", now
        if not batch or last_page <= now:  # no batch open: the next one goes a wait after the group's last page
            last_page = max(last_page + wait, now)
            batch = f"group/{key}/{int(last_page * 1000)}"
        conn.execute("UPDATE page_groups SET last_member_at = ?, last_page_at = ?, batch_key = ?, runs = ? "
                     "WHERE sink = ? AND group_key = ?", (now, last_page, batch, json.dumps(runs + [alert.run_id]),
                                                          sink, key))
        return batch, last_page

    def _resolved(self, conn, alert: Alert, sinks: list[str], now: float) -> None:
        incident = conn.execute("SELECT page_key, current_key, flapping, clear_due FROM incidents WHERE run_id = ? "
                                "AND rule = ?", (alert.run_id, alert.rule)).fetchone()
        closes = incident is not None and incident[1] == alert.dedup_key and incident[3] == 0
        page_key = incident[0] if closes else ""
        for sink in sinks:
            firing = conn.execute("SELECT status, page, kind FROM outbox WHERE sink = ? AND dedup_key = ? "
                                  "AND state = 'firing'", (sink, alert.dedup_key)).fetchone()
            if firing is not None and firing[0] == "silenced":
                self._insert(conn, sink, alert, now, now, "silenced", firing[1])
            elif closes and alert.dedup_key != page_key:
                self._insert(conn, sink, alert, now, now, "merged", page_key)
            elif not closes:
                page = firing[1] if firing else ""
                self._insert(conn, sink, alert, now, now, page=page, kind=firing[2] if firing else "")
                settle_bundle_resolutions(conn, sink, page)
        if closes:
            self._hold_resolution(conn, alert, sinks, page_key, bool(incident[2]), now)

    def _hold_resolution(self, conn, alert: Alert, sinks: list[str], page_key: str, flapping: bool,
                         now: float) -> None:
        """The incident's page resolves once it stayed clear for the hold (the settle period, if it flapped)."""
        hold = max(self.settings.resolve_hold_seconds, self.settings.flap_settle_seconds if flapping else 0.0)
        due = now + hold
        conn.execute("UPDATE incidents SET clear_due = ? WHERE run_id = ? AND rule = ?", (due, alert.run_id,
                                                                                          alert.rule))
        resolution = alert.model_copy(update={"dedup_key": page_key})
        if flapping:
            transitions = self._crossings(conn, alert, now)
            resolution = resolution.model_copy(update={"message": f"settled after flapping: {transitions} "
                                                       f"transitions in the last "
                                                       f"{_ago(self.settings.flap_window_seconds)}"})
        for sink in sinks:
            paged = conn.execute("SELECT status, page, kind FROM outbox WHERE sink = ? AND dedup_key = ? "
                                 "AND state = 'firing'", (sink, page_key)).fetchone()
            if paged is None or paged[0] not in ("pending", "delivered", "failed"):
                continue
            self._added += conn.execute("SELECT count(*) = 0 FROM outbox WHERE sink = ? AND dedup_key = ? "
                                        "AND state = 'resolved'", (sink, page_key)).fetchone()[0]
            conn.execute(
                "INSERT INTO outbox (sink, dedup_key, state, alert, enqueued_at, next_attempt_at, page, kind) "
                "VALUES (?, ?, 'resolved', ?, ?, ?, ?, ?) ON CONFLICT (sink, dedup_key, state) DO UPDATE SET "
                "alert = excluded.alert, next_attempt_at = excluded.next_attempt_at, status = 'pending' "
                "WHERE status IN ('superseded', 'pending', 'waiting') AND holder = ''",
                (sink, page_key, resolution.model_dump_json(), now, due, paged[1], paged[2]))
            settle_bundle_resolutions(conn, sink, paged[1])

    # --- silences that ended, and old state -----------------------------------------------------------------

    def release_silenced(self, silences: list[Silence]) -> int:
        """Page the incidents still firing that silences which have ended (expired, removed) held back: per sink,
        one page for each ended silence (a bundle if several). Another silence still active keeps them. Returns
        the rows released."""
        now = self._clock()
        moment = datetime.fromtimestamp(now, timezone.utc)
        active = {s.silence_id: s for s in silences if s.active(moment)}
        released = 0
        still_silenced = [SILENCE_PAGE + silence_id for silence_id in active]
        with self.outbox.transaction() as conn:
            held = conn.execute(
                "SELECT o.sink, o.dedup_key, o.alert, o.page, EXISTS (SELECT 1 FROM crossings AS c WHERE "
                "c.dedup_key = o.dedup_key AND c.state = 'resolved') FROM outbox AS o WHERE o.status = 'silenced' "
                f"AND o.state = 'firing' AND o.page LIKE '{SILENCE_PAGE}%' "
                f"AND o.page NOT IN ({', '.join('?' * len(still_silenced))})", still_silenced).fetchall()
            by_page: dict[tuple[str, str], list[tuple[str, Alert]]] = {}
            for sink, key, alert_json, page, resolved in held:
                if resolved:  # it resolved while silenced: nothing to page, and no need to look at it again
                    conn.execute("UPDATE outbox SET page = ? WHERE sink = ? AND dedup_key = ? AND state = 'firing'",
                                 (SILENCE_OVER + page.removeprefix(SILENCE_PAGE), sink, key))
                    continue
                alert = Alert.model_validate_json(alert_json)
                still = next((s for s in active.values() if s.matches(alert.run_id, alert.experiment, alert.rule,
                                                                      "")), None)
                if still is not None:  # (a host matcher cannot be judged here: the host is not stored with it)
                    conn.execute("UPDATE outbox SET page = ? WHERE sink = ? AND dedup_key = ? AND state = 'firing'",
                                 (SILENCE_PAGE + still.silence_id, sink, key))
                    continue
                by_page.setdefault((sink, page), []).append((key, alert))
            for (sink, page), rows in by_page.items():
                bundle = f"silence-ended/{page.removeprefix(SILENCE_PAGE)}" if len(rows) > 1 else ""
                conn.executemany("UPDATE outbox SET status = 'pending', page = ?, kind = ?, next_attempt_at = ?, "
                                 "enqueued_at = ? WHERE sink = ? AND dedup_key = ? AND state = 'firing'",
                                 [(bundle, "silence_ended", now, now, sink, key) for key, _ in rows])
                released += len(rows)
        return released

    def forget_old(self) -> None:
        """Groups gone quiet, incidents resolved, and crossings older than the outbox keeps its rows."""
        now = self._clock()
        with self.outbox.transaction() as conn:
            conn.execute("DELETE FROM page_groups WHERE last_member_at < ? AND last_page_at < ?",
                         (now - self.settings.group_wait_seconds - 60, now - 60))
            conn.execute("DELETE FROM incidents WHERE clear_due != 0 AND clear_due < ?", (now - 60,))
            conn.execute("DELETE FROM crossings WHERE seen_at < ?", (now - max(KEEP_SECONDS,
                                                                           self.settings.flap_window_seconds),))
