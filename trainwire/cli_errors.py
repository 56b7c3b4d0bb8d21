"""How the `trainwire` command fails: one line that names what was wrong and what to do, an exit code per kind of
failure, and never a traceback or a library's log flood (issue 17, item 4).

Under `--json` a failure is one JSON object on stdout, `{"error": "...", "exit_code": N}`, and nothing on stderr:
a script reading stdout gets JSON whichever way the command ends (as a run lookup's failure, cli_runs.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from trainwire.infra.config import ConfigError
from trainwire.infra.redact import redact_url

EXIT_FAILED = 1  # something went wrong that has no code of its own (an OSError, a bug)
EXIT_USAGE = 2  # a bad option, argument or setting: nothing was done
# 3-8: the commands' own (dead-letter limit, fenced consumer, Kafka unavailable, no such run, ambiguous run, gates
# not evaluated): README's exit-code table
EXIT_STORE_UNAVAILABLE = 9  # the store cannot be reached, refuses the query, or no consumer has set it up yet
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports it

TRACEBACK_VARIABLE = "TRAINWIRE_TRACEBACK"  # set to 1: an unexpected error shows its traceback, for a bug report

# Every character a terminal may act on (colours, cursor moves, a title change, a bell), bar the line break.
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")


def terminal_safe(text: str) -> str:
    """`text` with its control characters written out (ESC as \\x1b): event fields (run names, messages, reasons)
    are anyone's to set, and a run named "a\\x1b[31mb" must not colour, move or retitle the reader's terminal."""
    return _CONTROL.sub(lambda match: ascii(match[0])[1:-1], text)


@dataclass(frozen=True)
class Failure:
    message: str
    exit_code: int


class UsageError(ValueError):
    """An option's value that argparse's types let through (a port of 70000, a negative pause): exit 2."""


def quiet_libraries() -> None:
    """The store's HTTP client logs every retry and the exception it then raises (some 110 lines for one refused
    connection); the command says it once, in its own words. (clickhouse_connect sets the `urllib3` logger's level
    when imported, so its child, which logs the retries, is the one quietened.)"""
    for name in ("urllib3.connectionpool", "clickhouse_connect"):
        logging.getLogger(name).setLevel(logging.ERROR)


_PORT_OPTIONS = ("port", "metrics_port")
_SECONDS_OPTIONS = {"step_seconds": 0.0, "idle_seconds": None, "timeout": 0.0}  # least value allowed (None: > 0)


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse option values the command would fail on later, with a traceback, or silently misread."""
    for name in _PORT_OPTIONS:
        value = getattr(args, name, None)
        if value is not None and not 1 <= value <= 65535:
            raise UsageError(f"argument --{name.replace('_', '-')}: {value} is not a port (1-65535)")
    for name, least in _SECONDS_OPTIONS.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        if not math.isfinite(value) or (value < least if least is not None else value <= 0):
            bound = f"at least {least:g}" if least is not None else "more than 0"
            raise UsageError(f"argument --{name.replace('_', '-')}: {value:g} seconds: expected {bound}")


def check_home(home: Path) -> None:
    """TRAINWIRE_HOME is a directory, made here if missing (every command that uses it would make it): said before a
    command puts its store, log or audit key there and fails with a traceback. Made, not predicted from
    permissions: root may write anywhere and still not create /proc/x."""
    if home.exists() and not home.is_dir():
        raise ConfigError(f"TRAINWIRE_HOME {str(home)!r} is not a directory: set TRAINWIRE_HOME to a directory "
                          "this user can write")
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"TRAINWIRE_HOME {str(home)!r} cannot be created ({err.strerror or err}): set "
                          "TRAINWIRE_HOME to a directory this user can write") from None
    if not os.access(home, os.W_OK | os.X_OK):
        raise ConfigError(f"TRAINWIRE_HOME {str(home)!r} cannot be written: set TRAINWIRE_HOME to a directory this "
                          "user can write")


def describe_failure(err: BaseException, store_dsn: Callable[[], str]) -> Failure | None:
    """The one line and exit code of a failure the command did not handle itself; None if it is none of these."""
    from trainwire.infra.log.base import TransportError

    if isinstance(err, TransportError):  # e.g. the cluster's metadata could not be read
        return Failure(f"{err}: check TRAINWIRE_KAFKA (or --kafka) and that the broker is up", 5)
    try:
        store = redact_url(store_dsn())
    except Exception:  # noqa: BLE001 (the settings that name the store failed too: say the first failure)
        store = "the store"
    try:
        from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError
    except ImportError:  # a producer-only install: no store here
        DatabaseError = OperationalError = ()  # noqa: N806
    if isinstance(err, OperationalError):  # an HTTP store that does not answer
        return Failure(f"cannot reach the store at {store} ({_connection_problem(str(err))}): check "
                       "TRAINWIRE_STORE (or --store) and that ClickHouse is up", EXIT_STORE_UNAVAILABLE)
    if isinstance(err, DatabaseError) and re.search(r"UNKNOWN_(TABLE|DATABASE)|Code: (60|81)\.", str(err)):
        return Failure(f"the store at {store} has no trainwire tables yet: run `trainwire up` or `trainwire "
                       "consume` first (either sets it up), or point TRAINWIRE_STORE (or --store) at the store they "
                       "use", EXIT_STORE_UNAVAILABLE)
    if isinstance(err, DatabaseError):
        return Failure(f"the store at {store} refused the query: {_first_line(str(err))}", EXIT_STORE_UNAVAILABLE)
    if isinstance(err, OSError):
        where = f": {err.filename}" if err.filename else ""
        return Failure(f"{err.strerror or err}{where}", EXIT_FAILED)
    return None


def _connection_problem(text: str) -> str:
    for known in ("Connection refused", "Name or service not known", "timed out", "No route to host",
                  "Temporary failure in name resolution", "Connection reset"):
        if known.lower() in text.lower():
            return known.lower()
    return _first_line(text)[:160]


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def unexpected(err: BaseException) -> Failure:
    """A bug, said in one line; the traceback only when asked for."""
    return Failure(f"unexpected {type(err).__name__}: {_first_line(str(err))[:300]} (a bug: set "
                   f"{TRACEBACK_VARIABLE}=1 for the traceback to report)", EXIT_FAILED)


def report(args: argparse.Namespace | None, failure: Failure) -> int:
    """Say the failure (JSON on stdout under --json, else one line on stderr) and return its exit code."""
    message = terminal_safe(" ".join(failure.message.split("\n")))
    if args is not None and getattr(args, "json", False):
        print(json.dumps({"error": message, "exit_code": failure.exit_code}))
    else:
        print(f"trainwire: error: {message}", file=sys.stderr)
    return failure.exit_code


def needs_kafka_check(args: argparse.Namespace) -> bool:
    """Commands that talk to Kafka without checking it first: checked before they start (consume, alerts, up and
    spool replay check it themselves)."""
    if args.command == "demo":
        return True
    return args.command == "dead-letters" and getattr(args, "action", None) == "replay" and not args.dry_run
