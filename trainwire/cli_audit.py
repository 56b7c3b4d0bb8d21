"""`trainwire audit`: a run's audit record, and the audit log checked, shown, exported and verified offline."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

TARGETS = ("verify", "log", "export", "verify-bundle", "keygen")


def add_audit_command(command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    from trainwire.cli import _ACTOR_DEFAULT

    audit = command("audit", "a run's audit record; `audit verify`: check the audit log; `audit log`: show it; "
                    "`audit export RUN_ID --out FILE`: a bundle to verify offline with `audit verify-bundle FILE`; "
                    "`audit keygen`: a signing key pair")
    audit.add_argument("target", metavar="RUN_ID|" + "|".join(TARGETS))
    audit.add_argument("subject", nargs="?", metavar="RUN_ID|FILE", help="export: the run; verify-bundle: the file")
    audit.add_argument("--export", metavar="FILE", help="RUN_ID: write the audit record to FILE as JSON")
    audit.add_argument("--out", metavar="FILE|DIR", help="export: the bundle file; keygen: the directory for "
                       "audit-key.pem and audit-key.pub.pem (default: TRAINWIRE_HOME)")
    audit.add_argument("--public-key", metavar="PEM", action="append", help="verify-bundle: a public key to trust "
                       "(repeatable; default: the bundle's own keys, which prove it intact but not who made it)")
    audit.add_argument("--head", metavar="HASH", help="verify: a head noted earlier that must still be in the log")
    audit.add_argument("--run", metavar="RUN_ID", help="log: only this run's entries")
    audit.add_argument("--actor", help=f"who asks ({_ACTOR_DEFAULT})")
    audit.set_defaults(func=cmd_audit)


def cmd_audit(args: argparse.Namespace) -> int:
    wanted = {"export": "the RUN_ID to export", "verify-bundle": "the bundle FILE"}.get(args.target)
    if wanted and args.subject is None:
        raise ValueError(f"audit {args.target} needs {wanted}")
    if not wanted and args.subject is not None:
        raise ValueError(f"audit {args.target} takes no {args.subject!r}")
    try:
        return _COMMANDS.get(args.target, _record)(args)
    except RuntimeError as err:  # `up`'s API or the store failed: one line, no traceback
        print(f"trainwire: error: {err}", file=sys.stderr)
        return 1


def _verify(args: argparse.Namespace) -> int:
    from trainwire.cli import _actor, _emit, _govern, _settings

    settings = _settings(args)
    result = _govern(settings, "verify", actor=_actor(args, settings), head=args.head)
    anchors = "; ".join(f"anchored head {a['seq']} in {a['where']}" for a in result.get("anchors") or []) or (
        "no anchored head for this store")
    human = (f"audit log verified: {result['entries']} entries, head {result['head']} ({anchors})" if result["ok"]
             else "AUDIT LOG DOES NOT VERIFY:\n" + "\n".join(f"  {p}" for p in result["problems"]))
    _emit(args, result, human)
    return 0 if result["ok"] else 1


def _log(args: argparse.Namespace) -> int:
    from trainwire.cli import _actor, _emit, _govern, _settings

    settings = _settings(args)
    entries = _govern(settings, "audit_trail", actor=_actor(args, settings), run_id=args.run)
    _emit(args, entries, "\n".join(f"{e['seq']:>6} {e['ts']} {e['actor']:<12} {e['action']:<20} "
                                    f"{e['run_id'] or '-':<36} {e['details']}" for e in entries))
    return 0


def _export(args: argparse.Namespace) -> int:
    from trainwire.cli import _actor, _emit, _govern, _settings
    from trainwire.infra.store.audit_bundle import bundle_bytes

    if not args.out:
        raise ValueError("audit export RUN_ID needs --out FILE")
    settings = _settings(args)
    bundle = _govern(settings, "audit_bundle", run_id=args.subject, actor=_actor(args, settings), export=args.out)
    Path(args.out).write_bytes(bundle_bytes(bundle))
    _emit(args, {"run_id": args.subject, "file": args.out, "entries": len(bundle["entries"]),
                 "head": bundle["anchor"]["entry_hash"]},
          f"audit bundle of {args.subject} → {args.out} ({len(bundle['entries'])} entries up to anchored head "
          f"{bundle['anchor']['seq']}); check it with `trainwire audit verify-bundle {args.out} --public-key PEM`")
    return 0


def _verify_bundle(args: argparse.Namespace) -> int:
    from trainwire.cli import _emit
    from trainwire.infra.store.audit_bundle import verify_bundle

    try:
        data = Path(args.subject).read_bytes()
        keys = [Path(path).read_bytes() for path in args.public_key or []]
    except OSError as err:
        raise ValueError(f"audit verify-bundle: {err}") from None
    result = verify_bundle(data, keys)
    human = (f"audit bundle verified: run {result['run_id']}, {result['entries']} entries, head {result['head']} "
             f"(keys: {result['keys']})" if result["ok"] else
             "AUDIT BUNDLE DOES NOT VERIFY:\n" + "\n".join(f"  {p}" for p in result["problems"]))
    _emit(args, result, human)
    return 0 if result["ok"] else 1


def _keygen(args: argparse.Namespace) -> int:
    from trainwire.cli import _emit, _settings
    from trainwire.infra.store.audit_signing import key_id, load_private_key, write_key_pair

    directory = Path(args.out) if args.out else _settings(args).home
    try:
        private, public = write_key_pair(directory)
    except FileExistsError as err:
        raise ValueError(str(err)) from None
    kid = key_id(load_private_key(private).public_key())
    _emit(args, {"private_key": str(private), "public_key": str(public), "key_id": kid},
          f"key {kid}\n  private {private} (0600: keep it on the appending hosts only; TRAINWIRE_AUDIT_KEY)\n"
          f"  public  {public} (for verifiers: TRAINWIRE_AUDIT_PUBLIC_KEYS, verify-bundle --public-key)")
    return 0


def _record(args: argparse.Namespace) -> int:
    from trainwire.cli import _actor, _emit, _govern, _settings

    settings = _settings(args)
    record = _govern(settings, "audit_record", run_id=args.target, actor=_actor(args, settings), export=args.export)
    if args.export:
        with open(args.export, "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=2)
        _emit(args, {"run_id": args.target, "file": args.export}, f"audit record of {args.target} → {args.export}")
    else:
        _emit(args, record, "\n".join(_flatten(record)))
    return 0


def _flatten(value: Any, prefix: str = "") -> list[str]:
    if isinstance(value, dict) and value:
        return [line for key, item in value.items() for line in _flatten(item, f"{prefix}{key}.")]
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return [line for i, item in enumerate(value) for line in _flatten(item, f"{prefix}{i}.")]
    return [f"{prefix.rstrip('.'):<52} {value}"]


_COMMANDS = {"verify": _verify, "log": _log, "export": _export, "verify-bundle": _verify_bundle, "keygen": _keygen}
