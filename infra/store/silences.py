"""Silences (docs/alerting.md): while one is active, the alert consumer records the pages it matches as silenced
instead of sending them, for every sink.

A silence matches alerts by run, experiment, rule and host: each matcher it names must equal the alert's (it names
at least one), from its creation until it ends (`--for`, `--until`) or is removed. Silences live in the store's
`silences` table (migration 008), one row per version; creating, removing and the expiry of a silence are each an
entry of the audit log (`alerts.silence_created`, `alerts.silence_removed`, `alerts.silence_expired`).
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Any

from clickhouse_connect.driver.client import Client

from .audit_chain import append_entry, append_lock, iso_utc
from .read import Row, StoreReader

MATCHERS = ("run_id", "experiment", "rule", "host")
MAX_SECONDS = 90 * 24 * 3600.0  # a silence longer than a quarter is a rule switched off: change the rule instead
COLUMNS = ["silence_id", *MATCHERS, "starts_at", "ends_at", "reason", "created_by", "created_at", "removed_by",
           "removed_at", "expiry_noted", "updated_at"]
CREATED, REMOVED, EXPIRED = "alerts.silence_created", "alerts.silence_removed", "alerts.silence_expired"


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def _now() -> datetime:
    now = datetime.now(timezone.utc)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)  # the store keeps milliseconds


@dataclass(frozen=True)
class Silence:
    silence_id: str
    starts_at: datetime
    ends_at: datetime
    created_at: datetime
    updated_at: datetime
    run_id: str = ""
    experiment: str = ""
    rule: str = ""
    host: str = ""
    reason: str = ""
    created_by: str = ""
    removed_by: str = ""
    removed_at: datetime | None = None
    expiry_noted: bool = False

    @classmethod
    def from_row(cls, row: Row) -> Silence:
        times = {k: _utc(row[k]) for k in ("starts_at", "ends_at", "created_at", "updated_at")}
        removed = _utc(row["removed_at"]) if row.get("removed_at") else None
        return cls(**{k: row[k] for k in ("silence_id", *MATCHERS, "reason", "created_by", "removed_by")},
                   **times, removed_at=removed, expiry_noted=bool(row.get("expiry_noted")))

    @property
    def ended_at(self) -> datetime:
        return min(self.ends_at, self.removed_at) if self.removed_at else self.ends_at

    def active(self, now: datetime) -> bool:
        return self.starts_at <= now < self.ended_at

    def matches(self, run_id: str, experiment: str, rule: str, host: str) -> bool:
        given = {"run_id": run_id, "experiment": experiment, "rule": rule, "host": host}
        return all(getattr(self, name) in ("", given[name]) for name in MATCHERS)

    def covers_run(self, run_id: str, experiment: str, host: str) -> bool:
        """Matches every alert of the run (names no rule)."""
        return not self.rule and self.matches(run_id, experiment, "", host)

    @property
    def needs_host(self) -> bool:
        return bool(self.host)

    def describe_matchers(self) -> str:
        return ", ".join(f"{name.removesuffix('_id')}={getattr(self, name)}" for name in MATCHERS
                         if getattr(self, name))

    def status(self, now: datetime) -> str:
        if self.removed_at is not None and self.removed_at <= now:
            return "removed"
        return "active" if self.active(now) else ("expired" if now >= self.ends_at else "pending")

    def to_dict(self, now: datetime | None = None) -> dict[str, Any]:
        fields = asdict(self)
        fields.update({k: iso_utc(v) for k, v in fields.items() if isinstance(v, datetime)})
        fields["matchers"] = self.describe_matchers()
        fields["status"] = self.status(now or _now())
        return fields

    def row(self) -> list[Any]:
        return [getattr(self, column) for column in COLUMNS]


def active_silences(silences: list[Silence], now: datetime | None = None) -> list[Silence]:
    now = now or _now()
    return [s for s in silences if s.active(now)]


class SilenceBook:
    """Create, remove and list silences, each change audited. Served by `trainwire up`'s API as the actions
    `create_silence`, `remove_silence` and `list_silences` for CLI calls made while it owns the embedded store."""

    def __init__(self, client: Client):
        self._client = client
        self._reader = StoreReader(client)

    def _stored(self) -> list[Silence]:
        return [Silence.from_row(row) for row in self._reader.silences(include_ended=True)]

    def _write(self, silence: Silence) -> None:
        self._client.insert("silences", [silence.row()], column_names=COLUMNS)

    def create_silence(self, actor: str, reason: str, for_seconds: float | None = None, until: str | None = None,
                       run_id: str = "", experiment: str = "", rule: str = "", host: str = "") -> dict[str, Any]:
        matchers = {"run_id": run_id.strip(), "experiment": experiment.strip(), "rule": rule.strip(),
                    "host": host.strip()}
        if not any(matchers.values()):
            raise ValueError("a silence needs at least one of --run, --experiment, --rule, --host")
        if not (reason or "").strip():
            raise ValueError("a silence needs --reason: why these pages may wait")
        now = _now()
        ends = _end(now, for_seconds, until)
        silence = Silence(silence_id=f"sil-{uuid.uuid4().hex[:10]}", starts_at=now, ends_at=ends, created_at=now,
                          updated_at=now, reason=reason.strip(), created_by=actor, **matchers)
        with append_lock:
            entry = append_entry(self._client, actor, CREATED, silence.run_id, _audited(silence))
            self._write(silence)
        return {**silence.to_dict(now), "audit_seq": entry.seq}

    def remove_silence(self, silence_id: str, actor: str, reason: str = "") -> dict[str, Any]:
        with append_lock:
            silence = next((s for s in self._stored() if s.silence_id == silence_id), None)
            if silence is None:
                raise ValueError(f"no silence {silence_id!r} (`trainwire alerts silences --all` lists them)")
            now = _now()
            if silence.status(now) in ("removed", "expired"):
                raise ValueError(f"silence {silence_id} already {silence.status(now)} at {iso_utc(silence.ended_at)}")
            removed = replace(silence, removed_by=actor, removed_at=now, updated_at=now)
            entry = append_entry(self._client, actor, REMOVED, silence.run_id, {**_audited(removed),
                                                                                 "why_removed": reason or ""})
            self._write(removed)
        return {**removed.to_dict(now), "audit_seq": entry.seq}

    def list_silences(self, include_ended: bool = False) -> list[dict[str, Any]]:
        now = _now()
        return [s.to_dict(now) for s in self._stored() if include_ended or s.active(now)]

    def note_expired(self, actor: str = "trainwire-alerts") -> list[Silence]:
        """Audit each silence that ran out on its own and is not noted yet (the alert consumer calls this as it
        reads the silences); returns them."""
        noted = []
        with append_lock:
            now = _now()
            for silence in self._stored():
                if silence.expiry_noted or silence.removed_at is not None or now < silence.ends_at:
                    continue
                append_entry(self._client, actor, EXPIRED, silence.run_id, _audited(silence))
                self._write(replace(silence, expiry_noted=True, updated_at=now))
                noted.append(silence)
        return noted


def _end(now: datetime, for_seconds: float | None, until: str | None) -> datetime:
    if (for_seconds is None) == (until is None):
        raise ValueError("give a silence an end: --for DURATION (e.g. 2h) or --until TIME, one of them")
    if for_seconds is not None:
        if not 0 < float(for_seconds) <= MAX_SECONDS:
            raise ValueError(f"--for must be more than 0 and at most {MAX_SECONDS / 86400:.0f} days")
        return now + timedelta(seconds=float(for_seconds))
    try:
        ends = _utc(datetime.fromisoformat(until))
    except (TypeError, ValueError):
        raise ValueError(f"--until {until!r}: expected an ISO 8601 time such as 2025-06-01T18:00 (UTC unless it "
                         "names a zone)") from None
    if ends <= now:
        raise ValueError(f"--until {until}: that time has passed")
    if (ends - now).total_seconds() > MAX_SECONDS:
        raise ValueError(f"--until must be at most {MAX_SECONDS / 86400:.0f} days ahead")
    return ends


def _audited(silence: Silence) -> dict[str, Any]:
    return {"silence_id": silence.silence_id, "matchers": {k: getattr(silence, k) for k in MATCHERS
                                                           if getattr(silence, k)},
            "starts_at": iso_utc(silence.starts_at), "ends_at": iso_utc(silence.ends_at), "reason": silence.reason,
            "created_by": silence.created_by}
