"""The audit log as a hash chain of signed entries, its head anchored outside the store.

Here, below every stage that writes it: governance (gates, registry, audit commands), silences and the dashboard
(who viewed what) append through `append_entry`.

Altering an entry breaks its own hash; deleting or inserting one breaks the sequence and the next entry's link.
Each entry's hash is signed with an Ed25519 key the store never holds (audit_signing.py), so entries appended
around trainwire, however well chained, carry no valid signature. After each append the new head goes to an
append-only anchor outside the store (audit_anchor.py), so a truncated or rewritten tail is caught too.
Appends are serialised across threads, processes sharing a home, and hosts sharing a server (audit_claims.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

from clickhouse_connect.driver.client import Client

from .audit_anchor import HeadPublisher, anchor_line, append_anchor
from .audit_claims import CLAIM_STALE_SECONDS, AppendLock, claim
from .audit_config import AuditConfig, chdb_path, config_for, store_identity
from .audit_signing import Signer, TrustedKeys

log = logging.getLogger(__name__)
GENESIS = "sha256:" + "0" * 64
ENTRY_COLUMNS = ["seq", "ts", "actor", "action", "run_id", "details", "prev_hash", "entry_hash", "key_id",
                 "signature"]
# One appender at a time (ingest hook, read API, CLI, dashboard): an entry must link to the true last entry.
# Re-entrant, so an operation that appends holds it across its own reads and writes.
append_lock = AppendLock()


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
    key_id: str = ""  # empty on entries from before signing began
    signature: str = ""

    def computed_hash(self) -> str:
        return entry_hash(self.seq, self.ts, self.actor, self.action, self.run_id, self.details, self.prev_hash)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ts": iso_utc(self.ts)}

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> "Entry":
        """An entry as `to_dict` wrote it (an exported bundle)."""
        ts = datetime.fromisoformat(row["ts"].replace("Z", "+00:00"))
        return cls(**{**{k: row[k] for k in ENTRY_COLUMNS if k in row}, "ts": ts})


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
    anchors: list[dict[str, Any]] = field(default_factory=list)  # the anchored heads checked

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


def signature_problems(entries: list[Entry], trusted: TrustedKeys) -> list[str]:
    """Every signature must verify with a trusted key; unsigned entries are accepted only before the first signed
    one (written before signing began)."""
    problems, first_signed = [], None
    for entry in entries:
        if entry.signature or entry.key_id:
            first_signed = entry.seq if first_signed is None else first_signed
            if problem := trusted.problem(entry.entry_hash, entry.key_id, entry.signature):
                problems.append(f"entry {entry.seq}: {problem}")
        elif first_signed is not None:
            problems.append(f"entry {entry.seq}: not signed, after signed entry {first_signed} (appended around "
                            "trainwire)")
    return problems


def anchor_problems(entries: list[Entry], anchored: dict[str, Any], trusted: TrustedKeys, where: str) -> list[str]:
    """The store must hold the anchored head: same sequence number, same hash."""
    seq, expected = anchored["seq"], anchored["entry_hash"]
    problems = []
    if problem := trusted.problem(expected, anchored.get("key_id", ""), anchored.get("signature", "")):
        problems.append(f"{where}: the anchored head (entry {seq}): {problem}")
    stored = {e.entry_hash for e in entries if e.seq == seq}
    if not stored:
        last = f"entry {entries[-1].seq}" if entries else "no entry"
        problems.append(f"truncated: the anchor records entry {seq} with hash {expected} ({where}); the store's "
                        f"last is {last}")
    elif expected not in stored:
        problems.append(f"rewritten: the anchor records entry {seq} with hash {expected} ({where}); the store's "
                        f"entry {seq} has hash {sorted(stored)[0]}")
    return problems


def verify_log(entries: list[Entry], trusted: TrustedKeys, anchored: dict[str, dict[str, Any] | None],
               head: str | None = None) -> Verification:
    """The chain, the signatures, and each anchored head (by where it was read: the file, the Kafka topic)."""
    chain = verify_chain(entries, head)
    problems = chain.problems + signature_problems(entries, trusted)
    for where, line in anchored.items():
        if line is not None:
            problems += anchor_problems(entries, line, trusted, where)
    return Verification(chain.entries, problems, chain.head, [{**a, "where": w} for w, a in anchored.items() if a])


def read_entries(client: Client, run_id: str | None = None) -> list[Entry]:
    from .read import StoreReader

    return [Entry(**row) for row in StoreReader(client).audit_log(run_id)]


def _head(client: Client) -> Entry | None:
    from .read import StoreReader

    row = StoreReader(client).audit_head()
    return Entry(**row) if row else None


class Appender:
    """Appends signed entries. `lock`, `file_lock` and `claims` are for tests that act as separate processes
    (each its own lock, no shared file lock); `claims` defaults to on for a ClickHouse server and off for chdb,
    which one process owns."""

    def __init__(self, lock: AppendLock = append_lock, file_lock: bool = True, claims: bool | None = None):
        self.lock, self.file_lock, self.claims = lock, file_lock, claims
        self._publishers: dict[AuditConfig, HeadPublisher | None] = {}

    def append(self, client: Client, actor: str, action: str, run_id: str, details: dict[str, Any]) -> Entry:
        if not actor or not actor.strip():
            raise ValueError(f"{action}: no actor (pass --actor or set $USER)")
        config = config_for(client)
        signer, store = config.signer(), store_identity(client)
        claims = self.claims if self.claims is not None else chdb_path(client) is None
        with self.lock:
            if self.file_lock:
                self.lock.hold_file(config.lock_path)
            entry = self._insert_next(client, signer, claims, actor, action, run_id, details)
            self._anchor(config, anchor_line(store, entry.seq, entry.entry_hash, entry.key_id, entry.signature))
        return entry

    def _insert_next(self, client: Client, signer: Signer, claims: bool, *fields: Any) -> Entry:
        claimant, deadline = uuid.uuid4().hex, time.monotonic() + 2 * CLAIM_STALE_SECONDS
        while True:
            head = _head(client)
            entry = next_entry(head, *fields)
            entry = replace(entry, key_id=signer.key_id, signature=signer.sign(entry.entry_hash))
            if not claims or (claim(client, entry.seq, claimant) and _seq_of(_head(client)) < entry.seq):
                client.insert("audit_log", [[getattr(entry, c) for c in ENTRY_COLUMNS]], column_names=ENTRY_COLUMNS)
                return entry
            if time.monotonic() > deadline:
                raise RuntimeError(f"audit log: could not append entry {entry.seq} (other appenders hold it)")
            _await_entry(client, entry.seq)

    def _anchor(self, config: AuditConfig, line: dict[str, Any]) -> None:
        try:
            append_anchor(config.anchor_path, line)
        except OSError as err:  # the entry is stored; verify will say the anchor lags
            log.error("audit anchor %s not written: %s", config.anchor_path, err)
        if config.settings is None or not config.settings.kafka:
            return
        if config not in self._publishers:
            try:
                self._publishers[config] = HeadPublisher(config.settings)
            except Exception as err:  # noqa: BLE001 - the file anchor stands; Kafka's copy is the optional one
                log.error("audit heads will not be published to Kafka: %s", err)
                self._publishers[config] = None
        try:
            if publisher := self._publishers[config]:
                publisher.publish(line)
        except Exception as err:  # noqa: BLE001
            log.error("audit head %s not published to Kafka: %s", line["seq"], err)


def _seq_of(entry: Entry | None) -> int:
    return -1 if entry is None else entry.seq


def _await_entry(client: Client, seq: int) -> None:
    """Wait for the claim's winner to append `seq` (or for its claim to go stale)."""
    give_up = time.monotonic() + CLAIM_STALE_SECONDS
    while _seq_of(_head(client)) < seq and time.monotonic() < give_up:
        time.sleep(random.uniform(0.005, 0.03))


_default_appender = Appender()


def append_entry(client: Client, actor: str, action: str, run_id: str, details: dict[str, Any]) -> Entry:
    """Append one signed entry, linked to the current last one, and anchor it. `details` must be JSON-ready."""
    return _default_appender.append(client, actor, action, run_id, details)
