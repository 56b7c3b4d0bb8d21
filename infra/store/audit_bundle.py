"""An audit bundle: one run's audit record with everything needed to check it offline, with only a public key.

The bundle holds the record, every audit log entry from the first up to the anchored head (the chain has to be
walked from genesis), the anchor line, and the public keys that signed them. The record is vouched for by its
hash in the signed `audit.exported` entry of the export, and the whole file by the exporting host's signature.
The file is canonical JSON, so a reformat is refused too.
"""

from __future__ import annotations

import json
from typing import Any

from .audit_chain import Entry, anchor_problems, canonical_json, sha256_of, signature_problems, verify_chain
from .audit_signing import BUNDLE, Signer, TrustedKeys, key_id, load_public_key

FORMAT = "trainwire-audit-bundle/1"
EXPORTED = "audit.exported"


def build_bundle(run_id: str, record: dict[str, Any], entries: list[Entry], anchor: dict[str, Any],
                 public_keys: dict[str, str], signer: Signer) -> dict[str, Any]:
    covered = [e.to_dict() for e in entries if e.seq <= anchor["seq"]]
    bundle = {"format": FORMAT, "run_id": run_id, "record": record, "entries": covered, "anchor": anchor,
              "public_keys": public_keys}
    return {**bundle, "signature": {"key_id": signer.key_id, "signature": signer.sign(sha256_of(bundle), BUNDLE)}}


def bundle_bytes(bundle: dict[str, Any]) -> bytes:
    """The bundle as its file holds it: canonical JSON, one line."""
    return (canonical_json(bundle) + "\n").encode()


def verify_bundle(data: bytes, public_keys: list[bytes] | None = None) -> dict[str, Any]:
    """Problems with the bundle; `public_keys` (PEM) are the keys to trust, else the bundle's own (which proves
    it is intact, not who made it)."""
    try:
        bundle = json.loads(data)
    except ValueError:
        bundle = None
    if not isinstance(bundle, dict) or bundle.get("format") != FORMAT:
        return _result(None, ["not a trainwire audit bundle (or damaged)"])
    if data != bundle_bytes(bundle):
        return _result(bundle, ["the file is not as exported (edited or reformatted)"])
    try:  # a damaged bundle may lack any part, or hold anything in it
        problems = _problems(bundle, public_keys)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        problems = [f"unreadable bundle: {type(err).__name__} {err}"]
    return _result(bundle, problems, own_keys=not public_keys)


def _problems(bundle: dict[str, Any], public_keys: list[bytes] | None) -> list[str]:
    entries = [Entry.from_dict(row) for row in bundle["entries"]]
    trusted = TrustedKeys.from_pems(public_keys if public_keys else list(bundle["public_keys"].values()))
    problems = _file_problems(bundle, trusted) + verify_chain(entries).problems
    problems += signature_problems(entries, trusted)
    problems += anchor_problems(entries, bundle["anchor"], trusted, "the bundle's anchor")
    if entries and entries[-1].seq != bundle["anchor"]["seq"]:
        problems.append(f"entries after the anchored head (entry {bundle['anchor']['seq']})")
    return problems + _record_problems(bundle, entries)


def _file_problems(bundle: dict[str, Any], trusted: TrustedKeys) -> list[str]:
    """The exporting host's signature over the whole bundle, and the bundle's keys named by their own ids."""
    unsigned = {k: v for k, v in bundle.items() if k != "signature"}
    signed = bundle.get("signature") or {}
    problems = []
    if problem := trusted.problem(sha256_of(unsigned), signed.get("key_id", ""), signed.get("signature", ""),
                                  BUNDLE):
        problems.append(f"the bundle as a whole: {problem}")
    for named, pem in bundle["public_keys"].items():
        try:
            if key_id(load_public_key(pem)) != named:
                problems.append(f"public key {named} in the bundle is another key")
        except ValueError as err:
            problems.append(f"public key {named} in the bundle is unreadable: {err}")
    return problems


def _record_problems(bundle: dict[str, Any], entries: list[Entry]) -> list[str]:
    run_id, record_hash = bundle["run_id"], sha256_of(bundle["record"])
    runs = [e for e in entries if e.run_id == run_id]
    if not runs:
        return [f"no audit log entry of run {run_id}"]
    exported = [e for e in runs if e.action == EXPORTED and json.loads(e.details).get("record_sha256") == record_hash]
    if not exported:
        return [f"the record of run {run_id} is not the one the log vouches for (no {EXPORTED} entry with its "
                f"hash {record_hash})"]
    return []


def _result(bundle: dict[str, Any] | None, problems: list[str], own_keys: bool = False) -> dict[str, Any]:
    anchor = (bundle or {}).get("anchor") or {}
    return {"ok": not problems, "problems": problems, "run_id": (bundle or {}).get("run_id"),
            "entries": len((bundle or {}).get("entries") or []), "head": anchor.get("entry_hash"),
            "keys": "the bundle's own" if own_keys else "given"}
