"""Naming a run on the command line: its full id, a unique id prefix (the dashboard shows the first 8 characters),
or its run name. A name or prefix that fits several runs is refused with the candidates listed, never guessed."""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from typing import Any

from trainwire.cli_output import column, json_text, table
from trainwire.infra.config import Settings

MIN_PREFIX = 4  # shorter prefixes match too much to be meant
EXIT_NO_SUCH_RUN = 6
EXIT_AMBIGUOUS_RUN = 7
RUN_HELP = "a run id, a unique id prefix of 4 or more characters (the dashboard shows 8), or a run name"


class RunLookupError(Exception):
    """RUN names no stored run, or several; `exit_code` tells which, `candidates` lists the several."""

    def __init__(self, message: str, exit_code: int, candidates: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.exit_code = exit_code
        self.candidates = candidates or []


@contextlib.contextmanager
def open_reader(settings: Settings) -> Iterator[Any]:
    """The store's read API, closed afterwards: directly, or through the running `trainwire up` that owns the
    embedded store (chdb lets one process open it)."""
    from trainwire.infra.store.api import RemoteReader, running_api

    if settings.embedded_store and (url := running_api(settings.home)):
        yield RemoteReader(url, settings.home)
        return
    from trainwire.infra.store import connect_store
    from trainwire.infra.store.read import StoreReader

    client = connect_store(settings.store_dsn)
    try:
        yield StoreReader(client)
    finally:
        client.close()


def stored_runs(reader: Any) -> list[dict[str, Any]]:
    """Every stored run, newest first; none in a store no ingest has set up yet."""
    if hasattr(reader, "migrated") and not reader.migrated():  # `up`'s API serves a migrated store only
        return []
    return reader.runs()


def match_run(runs: list[dict[str, Any]], text: str) -> str:
    """The id of the one run `text` names: its id, a unique id prefix of at least MIN_PREFIX characters, or its
    run name. An exact id wins over everything; otherwise every run named or prefixed by `text` is a candidate."""
    wanted = text.strip()
    if any(run["run_id"] == wanted for run in runs):
        return wanted
    prefix = wanted.lower() if len(wanted) >= MIN_PREFIX else None
    candidates = [run for run in runs
                  if run["run_name"] == wanted or (prefix is not None and run["run_id"].lower().startswith(prefix))]
    if len(candidates) == 1:
        return candidates[0]["run_id"]
    if not candidates:
        short = (f"; an id prefix needs at least {MIN_PREFIX} characters"
                 if len(wanted) < MIN_PREFIX and any(r["run_id"].startswith(wanted) for r in runs) else "")
        raise RunLookupError(f"no run {wanted!r} in the store (RUN is {RUN_HELP}; `trainwire runs` lists them)"
                             + short, EXIT_NO_SUCH_RUN)
    raise RunLookupError(f"{wanted!r} names {len(candidates)} runs: give a longer id prefix or the full id",
                         EXIT_AMBIGUOUS_RUN,
                         [{"run_id": r["run_id"], "run_name": r["run_name"], "started_at": r["started_at"]}
                          for r in candidates])


def resolve_run(settings: Settings, text: str) -> str:
    """The full id of the run `text` names (see `match_run`), read from the store."""
    with open_reader(settings) as reader:
        return match_run(stored_runs(reader), text)


CANDIDATE_COLUMNS = (column("Run id", "run_id"), column("Name", "run_name"), column("Started", "started_at"))


def reports_run_lookup(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A command that names a run: a RUN that names no run or several ends it with its own exit code and one
    message (the candidates under it), as JSON on stdout under --json."""

    @functools.wraps(command)
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except RunLookupError as err:
            if getattr(args, "json", False):
                print(json_text({"error": str(err), "exit_code": err.exit_code, "candidates": err.candidates}))
            else:
                print(f"trainwire: error: {err}", file=sys.stderr)
                if err.candidates:
                    print(table(err.candidates, CANDIDATE_COLUMNS, ""), file=sys.stderr)
            return err.exit_code

    return wrapped
