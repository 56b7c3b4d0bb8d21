"""The audit log as a hash chain: each entry's hash covers its fields and the previous entry's hash.

Here, below every stage that writes it: governance (gates, registry, audit commands) and the dashboard (who viewed
what) append through `append_entry`.

Altering an entry breaks its own hash; deleting or inserting one breaks the sequence and the next entry's link.
Rewriting every entry after the altered one is only caught against a head hash noted earlier (`verify(head=…)`):
auditors keep the head that `trainwire audit verify` prints.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from clickhouse_connect.driver.client import Client

from .read import StoreReader

GENESIS = "sha256:" + "0" * 64
ENTRY_COLUMNS = ["seq", "ts", "actor", "action", "run_id", "details", "prev_hash", "entry_hash"]
# One appender at a time in a process (ingest hook, read API, CLI, dashboard): an entry must link to the true last
# entry. Re-entrant, so an operation that appends holds it across its own reads and writes.
append_lock = threading.RLock()


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def sha256_of(value: Any) -> str:
    """`sha256:<hex>` of a string's UTF-8 bytes, or of anything else's canonical JSON."""
    text = value if isinstance(value, str) else canonical_json(value)
    return f"sha256:{hashlib.sha256(text.encode()).hexdigest()}"


def iso_utc(value: datetime | None) -> str | None:
    if value is None:
        return None
    value = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Entry:
    seq: int
    ts: datetime
    actor: str
    action: str
    run_id: str
    details: str  # canonical JSON, hashed as stored
    prev_hash: str
    entry_hash: str

    def computed_hash(self) -> str:
        return entry_hash(self.seq, self.ts, self.actor, self.action, self.run_id, self.details, self.prev_hash)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ts": iso_utc(self.ts)}


def entry_hash(seq: int, ts: datetime, actor: str, action: str, run_id: str, details: str, prev_hash: str) -> str:
    return sha256_of(canonical_json({"seq": seq, "ts": iso_utc(ts), "actor": actor, "action": action,
                                     "run_id": run_id, "details": details, "prev_hash": prev_hash}))


def next_entry(previous: Entry | None, actor: str, action: str, run_id: str, details: dict[str, Any],
               now: datetime | None = None) -> Entry:
    now = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    now = now.replace(microsecond=now.microsecond // 1000 * 1000)  # the store keeps milliseconds
    seq = 0 if previous is None else previous.seq + 1
    prev_hash = GENESIS if previous is None else previous.entry_hash
    text = canonical_json(details)
    return Entry(seq, now, actor, action, run_id, text, prev_hash,
                 entry_hash(seq, now, actor, action, run_id, text, prev_hash))


@dataclass(frozen=True)
class Verification:
    entries: int
    problems: list[str]
    head: str | None  # the last entry's hash: note it to catch a later rewrite or truncation

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_chain(entries: list[Entry], head: str | None = None) -> Verification:
    """Check entries in sequence order; every problem is named with the sequence number it is at."""
    problems: list[str] = []
    expected_seq, expected_prev = 0, GENESIS
    for entry in entries:
        if entry.seq < expected_seq:
            problems.append(f"entry {entry.seq}: appears more than once (an inserted entry or concurrent writers)")
            continue
        if entry.seq > expected_seq:
            gap = f"{expected_seq}" if entry.seq == expected_seq + 1 else f"{expected_seq}–{entry.seq - 1}"
            problems.append(f"entries {gap}: missing (deleted)")
        if entry.computed_hash() != entry.entry_hash:
            problems.append(f"entry {entry.seq}: altered (its hash does not match its contents)")
        elif entry.prev_hash != expected_prev and entry.seq == expected_seq:
            problems.append(f"entry {entry.seq}: does not follow entry {entry.seq - 1} (previous hash differs)")
        expected_seq, expected_prev = entry.seq + 1, entry.entry_hash
    last = entries[-1].entry_hash if entries else None
    if head is not None and head not in {e.entry_hash for e in entries}:
        problems.append(f"head {head} noted earlier is not in the log (entries after it rewritten or removed)")
    return Verification(len(entries), problems, last)


def append_entry(client: Client, actor: str, action: str, run_id: str, details: dict[str, Any]) -> Entry:
    """Append one entry, linked to the current last one. `details` must be JSON-ready."""
    if not actor or not actor.strip():
        raise ValueError(f"{action}: no actor (pass --actor or set $USER)")
    with append_lock:
        head = StoreReader(client).audit_head()
        entry = next_entry(Entry(**head) if head else None, actor, action, run_id, details)
        client.insert("audit_log", [[getattr(entry, c) for c in ENTRY_COLUMNS]], column_names=ENTRY_COLUMNS)
        return entry

