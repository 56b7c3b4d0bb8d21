"""`trainwire audit`: a run's audit record, and the audit log checked, shown, exported and verified offline."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainwire.cli_errors import EXIT_FAILED, Failure, report
from trainwire.cli_output import cell, column, stage_value, table
from trainwire.cli_runs import RUN_HELP, reports_run_lookup, resolve_run

TARGETS = ("verify", "log", "export", "verify-bundle", "keygen")


def add_audit_command(command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    from trainwire.cli import _ACTOR_DEFAULT

    audit = command("audit", "a run's audit record; `audit verify`: check the audit log; `audit log`: show it; "
                    "`audit export RUN_ID --out FILE`: a bundle to verify offline with `audit verify-bundle FILE`; "
                    "`audit keygen`: a signing key pair")
    audit.add_argument("target", metavar="RUN|" + "|".join(TARGETS), help=f"RUN: {RUN_HELP}")
    audit.add_argument("subject", nargs="?", metavar="RUN|FILE", help="export: the run; verify-bundle: the file")
    audit.add_argument("--export", metavar="FILE", help="RUN_ID: write the audit record to FILE as JSON")
    audit.add_argument("--out", metavar="FILE|DIR", help="export: the bundle file; keygen: the directory for "
                       "audit-key.pem and audit-key.pub.pem (default: TRAINWIRE_HOME)")
    audit.add_argument("--public-key", metavar="PEM", action="append", help="verify-bundle: a public key to trust "
                       "(repeatable; default: the bundle's own keys, which prove it intact but not who made it)")
    audit.add_argument("--head", metavar="HASH", help="verify: a head noted earlier that must still be in the log")
    audit.add_argument("--run", metavar="RUN", help="log: only this run's entries")
    audit.add_argument("--actor", help=f"who asks ({_ACTOR_DEFAULT})")
    audit.set_defaults(func=cmd_audit)


@reports_run_lookup
def cmd_audit(args: argparse.Namespace) -> int:
    wanted = {"export": "the RUN_ID to export", "verify-bundle": "the bundle FILE"}.get(args.target)
    if wanted and args.subject is None:
        raise ValueError(f"audit {args.target} needs {wanted}")
    if not wanted and args.subject is not None:
        raise ValueError(f"audit {args.target} takes no {args.subject!r}")
    try:
        return _COMMANDS.get(args.target, _record)(args)
    except RuntimeError as err:  # `up`'s API or the store failed: one line (JSON under --json), no traceback
        return report(args, Failure(str(err), EXIT_FAILED))


def _verify(args: argparse.Namespace) -> int:
    from trainwire.cli import _actor, _emit, _govern, _settings

    settings = _settings(args)
    result = _govern(settings, "verify", actor=_actor(args, settings), head=args.head)
    anchors = "; ".join(f"anchored head {a['seq']} in {a['where']}" for a in result.get("anchors") or []) or (
        "no anchored head for this store")
    head = f"head {result['head']}" if result["head"] else "no head yet"
    human = (f"audit log verified: {result['entries']} entries, {head} ({anchors})" if result["ok"]
             else "AUDIT LOG DOES NOT VERIFY:\n" + "\n".join(f"  {p}" for p in result["problems"]))
    _emit(args, result, human)
    return 0 if result["ok"] else 1


LOG_COLUMNS = (column("Seq", right=True), column("Time (UTC)", "ts"), column("Actor"), column("Action"),
               column("Run id", "run_id"), column("Details"))


def _log(args: argparse.Namespace) -> int:
    from trainwire.cli import _actor, _emit, _govern, _settings

    settings = _settings(args)
    run_id = None if args.run is None else resolve_run(settings, args.run)
    entries = _govern(settings, "audit_trail", actor=_actor(args, settings), run_id=run_id)
    _emit(args, entries, table(entries, LOG_COLUMNS, "the audit log is empty"))
    return 0


def _export(args: argparse.Namespace) -> int:
    from trainwire.cli import _actor, _emit, _govern, _settings
    from trainwire.infra.store.audit_bundle import bundle_bytes

    if not args.out:
        raise ValueError("audit export RUN_ID needs --out FILE")
    settings = _settings(args)
    run_id = resolve_run(settings, args.subject)
    bundle = _govern(settings, "audit_bundle", run_id=run_id, actor=_actor(args, settings), export=args.out)
    Path(args.out).write_bytes(bundle_bytes(bundle))
    _emit(args, {"run_id": run_id, "file": args.out, "entries": len(bundle["entries"]),
                 "head": bundle["anchor"]["entry_hash"]},
          f"audit bundle of {run_id} → {args.out} ({len(bundle['entries'])} entries up to anchored head "
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
    run_id = resolve_run(settings, args.target)
    record = _govern(settings, "audit_record", run_id=run_id, actor=_actor(args, settings), export=args.export)
    if args.export:  # as the log vouched for it (its sha256 is in the audit.exported entry): written unchanged
        with open(args.export, "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=2)
        _emit(args, {"run_id": run_id, "file": args.export}, f"audit record of {run_id} → {args.export}")
    else:
        record["registry_stage"] = stage_value(record["registry_stage"])
        human = _flatten({**record, "registry_stage": record["registry_stage"] or "none yet"})
        _emit(args, record, "\n".join(human))
    return 0


def _flatten(value: Any, prefix: str = "") -> list[str]:
    if isinstance(value, dict) and value:
        return [line for key, item in value.items() for line in _flatten(item, f"{prefix}{key}.")]
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return [line for i, item in enumerate(value) for line in _flatten(item, f"{prefix}{i}.")]
    exact = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return [f"{prefix.rstrip('.'):<52} {value if exact else cell(value)}"]  # a record's numbers in full


_COMMANDS = {"verify": _verify, "log": _log, "export": _export, "verify-bundle": _verify_bundle, "keygen": _keygen}
