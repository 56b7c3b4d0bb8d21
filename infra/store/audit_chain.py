"""The audit log as a hash chain of signed entries, its head anchored outside the store.

Here, below every stage that writes it: governance (gates, registry, audit commands), silences and the dashboard
(who viewed what) append through `append_entry`.

Altering an entry breaks its own hash; deleting or inserting one breaks the sequence and the next entry's link.
Each entry's hash is signed with an Ed25519 key the store never holds (audit_signing.py), so entries appended
around trainwire, however well chained, carry no valid signature. After each append the new head goes to an
append-only anchor outside the store (audit_anchor.py), so a truncated or rewritten tail is caught too.
Appends are serialised across threads and processes sharing a home (audit_lock.py); across hosts the store itself
takes one entry per sequence number: each insert carries a deduplication token naming its seq, and the table keeps
a deduplication window (migration 009), so of two entries for seq N only the first lands, and the other appender,
reading back a hash not its own, retries on the new head.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

from clickhouse_connect.driver.client import Client

from .audit_anchor import HeadPublisher, anchor_line, append_anchor
from .audit_config import AuditConfig, config_for, store_identity
from .audit_lock import AppendLock, append_lock
from .audit_signing import Signer, TrustedKeys

log = logging.getLogger(__name__)
GENESIS = "sha256:" + "0" * 64
ENTRY_COLUMNS = ["seq", "ts", "actor", "action", "run_id", "details", "prev_hash", "entry_hash", "key_id",
                 "signature"]
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


def unvouched_reason(entry: Entry, trusted: TrustedKeys, first_signed: int | None) -> str | None:
    """Why one entry, read on its own, is not the log's word: altered, signed by no trusted key, or unsigned where
    entries are signed (None: it is). What registry reads rest on, so entries appended around trainwire never set a
    stage, whatever `verify` says of the rest of the log."""
    if entry.computed_hash() != entry.entry_hash:
        return "altered (its hash does not match its contents)"
    if entry.signature or entry.key_id:
        return trusted.problem(entry.entry_hash, entry.key_id, entry.signature)
    if first_signed is not None and entry.seq > first_signed:
        return f"not signed, after signed entry {first_signed} (appended around trainwire)"
    return None


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


APPEND_ATTEMPTS = 100


class Appender:
    """Appends signed entries. `lock` and `file_lock` are for tests that act as separate hosts (each its own lock,
    no shared file lock)."""

    def __init__(self, lock: AppendLock = append_lock, file_lock: bool = True):
        self.lock, self.file_lock = lock, file_lock
        self._publishers: dict[AuditConfig, HeadPublisher | None] = {}

    def append(self, client: Client, actor: str, action: str, run_id: str, details: dict[str, Any]) -> Entry:
        if not actor or not actor.strip():
            raise ValueError(f"{action}: no actor (an empty name)")
        config = config_for(client)
        signer, store = config.signer(), store_identity(client)
        with self.lock:
            if self.file_lock:
                self.lock.hold_file(config.lock_path)
            entry = _insert_next(client, signer, actor, action, run_id, details)
            self._anchor(config, anchor_line(store, entry.seq, entry.entry_hash, entry.key_id, entry.signature))
        return entry

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


def _insert_next(client: Client, signer: Signer, *fields: Any) -> Entry:
    """Insert the entry after the current head; if another host took that seq first, again after the new head."""
    generation = 0  # a deleted entry's token still blocks its seq (the window remembers it): then the next one
    for _ in range(APPEND_ATTEMPTS):
        entry = next_entry(_head(client), *fields)
        entry = replace(entry, key_id=signer.key_id, signature=signer.sign(entry.entry_hash))
        token = f"trainwire-audit-seq-{entry.seq}" + (f"-{generation}" if generation else "")
        client.insert("audit_log", [[getattr(entry, c) for c in ENTRY_COLUMNS]], column_names=ENTRY_COLUMNS,
                      settings={"insert_deduplication_token": token,
                                "insert_distributed_sync": 1})  # on a cluster: the shard's answer, not a queue's
        stored = client.query("SELECT entry_hash FROM audit_log WHERE seq = {seq:UInt64}",
                              parameters={"seq": entry.seq}).result_rows
        if (entry.entry_hash,) in stored:
            return entry
        generation = 0 if stored else generation + 1
        if stored:  # lost the seq to another host: let its entry settle, then follow it
            time.sleep(random.uniform(0.001, 0.02))
    raise RuntimeError(f"audit log: no entry appended after {APPEND_ATTEMPTS} attempts (seq taken each time)")


_default_appender = Appender()


def append_entry(client: Client, actor: str, action: str, run_id: str, details: dict[str, Any]) -> Entry:
    """Append one signed entry, linked to the current last one, and anchor it. `details` must be JSON-ready."""
    return _default_appender.append(client, actor, action, run_id, details)
