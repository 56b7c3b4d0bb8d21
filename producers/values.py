"""What the SDK makes of a caller's values before they become events.

`init` (run started) is checked on the caller's thread and refused with `InvalidRunError` naming the argument:
a run whose start is refused would be missing from the store. Everything logged later is checked on the sender
thread (cheap calls); here are the helpers for what `finish` is given (its run ended must go out) and the one that
makes a file name from a non-UTF-8 file system representable in Avro.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from trainwire.schemas import RunEnded, RunStarted, encode
from trainwire.schemas.events import UINT16_MAX

_FLOAT = TypeAdapter(float)
# Keywords of `init` that are not RunStarted fields, for the suggestion when a keyword is misspelt.
INIT_ARGUMENTS = ("experiment", "run_name", "config", "settings", "run_id", "team", "sample_gpus", "gpu_source",
                  "rank", "stop_on_block")
MAX_INTERVAL_SECONDS = 3600.0
# What run ended says of the run beyond its status; a value here that the event cannot hold is left out.
RUN_SUMMARY = frozenset({"error", "duration_s", "completed_steps", "epochs", "artifacts"})


class InvalidRunError(ValueError):
    """`trainwire.init` (or a `Run`) was given something it cannot record; `fields` names the arguments."""

    def __init__(self, message: str, fields: tuple[str, ...] = ()):
        super().__init__(message)
        self.fields = fields


def number(value: Any) -> float | None:
    """`value` as the float a metric field stores, or None where validation would refuse it."""
    if value.__class__ is float:
        return value
    try:
        return _FLOAT.validate_python(value)
    except (ValidationError, TypeError, ValueError):
        return None


def representable(text: str | os.PathLike | bytes) -> str:
    """A path or name as a string Avro can hold (UTF-8): a file name that is not UTF-8 (bytes, or the surrogate
    escapes `os.fsdecode` makes of them) keeps its readable part and shows the rest as `\\xNN` escapes, so it is
    recorded rather than refused."""
    raw = os.fspath(text)
    if isinstance(raw, bytes):
        return raw.decode("utf-8", "backslashreplace")
    try:
        raw.encode("utf-8")
        return raw
    except UnicodeEncodeError:
        pass
    try:
        return raw.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that no file system decoding made
        return raw.encode("utf-8", "backslashreplace").decode("utf-8")


def representable_files(files: Any) -> Any:
    """File digests with representable names; anything that is not a digest is left for validation to refuse."""
    if not isinstance(files, (list, tuple)):
        return files or []
    return [{**f, "name": representable(f["name"])} if isinstance(f, dict) and isinstance(f.get("name"), (str, bytes))
            else f for f in files or []]


def check_interval(name: str, seconds: Any) -> float:
    if not isinstance(seconds, (int, float)) or not 0 < seconds <= MAX_INTERVAL_SECONDS or math.isnan(seconds):
        raise InvalidRunError(f"{name}: expected seconds in (0, {MAX_INTERVAL_SECONDS:.0f}], got {seconds!r}",
                              (name,))
    return float(seconds)


def check_rank(rank: Any) -> int:
    if rank.__class__ is not int or not 0 <= rank <= UINT16_MAX:
        raise InvalidRunError(f"rank: expected an integer in 0…{UINT16_MAX}, got {rank!r}", ("rank",))
    return rank


def check_run_started(fields: dict[str, Any]) -> RunStarted:
    """The run started event for `fields` (envelope included), or InvalidRunError naming every bad argument:
    unknown keywords, values the model refuses, and strings Avro cannot hold (lone surrogates)."""
    unknown = sorted(set(fields) - set(RunStarted.model_fields))
    if unknown:
        raise InvalidRunError("trainwire.init: " + "; ".join(_unknown(name) for name in unknown), tuple(unknown))
    try:
        event = RunStarted(**fields)
    except ValidationError as err:
        raise InvalidRunError(f"trainwire.init: {_problems(err)}", _fields_of(err)) from None
    try:
        encode(event)
    except (UnicodeError, ValueError, TypeError, OverflowError) as err:
        bad = tuple(name for name, value in fields.items() if not _encodable(value)) or ("?",)
        raise InvalidRunError(f"trainwire.init: {', '.join(bad)}: cannot be encoded as Avro ({err})", bad) from None
    return event


def valid_run_ended(fields: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """`fields` with each summary value the run ended event would refuse replaced by its default (a bad artifact
    is left out), so that the run still ends; returns the fields and what was replaced. A bad status raises."""
    fields = {**fields, "error": None if fields.get("error") is None else representable(str(fields["error"])),
              "artifacts": representable_files(fields.get("artifacts"))}
    replaced: list[str] = []
    while True:
        try:
            RunEnded(**fields)
            return fields, replaced
        except ValidationError as err:
            loc = err.errors()[0]["loc"]
        name = str(loc[0]) if loc else "?"
        if name == "status":
            raise InvalidRunError(f"finish: status: expected one of completed, failed, stopped; got "
                                  f"{fields.get('status')!r}", ("status",))
        if name not in RUN_SUMMARY:
            return fields, replaced  # the envelope: every event of the run is refused, and counted, for it
        if name == "artifacts" and len(loc) > 1 and isinstance(loc[1], int):
            fields["artifacts"] = [f for i, f in enumerate(fields["artifacts"]) if i != loc[1]]
            replaced.append(f"artifacts[{loc[1]}]")
        else:
            fields[name] = [] if name == "artifacts" else None
            replaced.append(name)


def hyperparameters_json(config: dict) -> str:
    try:
        return json.dumps(config, default=str, sort_keys=True)
    except (TypeError, ValueError) as err:  # keys of mixed types cannot be sorted; a circular reference
        raise InvalidRunError(f"trainwire.init: config: cannot be written as JSON ({err})", ("config",)) from None


def config_path(config: Any) -> Path | None:
    if config is None or isinstance(config, dict):
        return None
    if isinstance(config, (str, os.PathLike)):
        return Path(config)
    raise InvalidRunError(f"trainwire.init: config: expected a dict or a file path, got {type(config).__name__}",
                          ("config",))


def _unknown(name: str) -> str:
    close = difflib.get_close_matches(name, [*RunStarted.model_fields, *INIT_ARGUMENTS], n=1)
    hint = f"did you mean {close[0]!r}?" if close else "hyperparameters go in config={...}"
    return f"unexpected keyword argument {name!r} ({hint})"


def _problems(err: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or '?'}: {e['msg']} (got {e.get('input')!r:.80})"
                     for e in err.errors())


def _fields_of(err: ValidationError) -> tuple[str, ...]:
    return tuple(dict.fromkeys(str(e["loc"][0]) for e in err.errors() if e["loc"]))


def _encodable(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return True
        except UnicodeEncodeError:
            return False
    if isinstance(value, dict):
        return all(_encodable(k) and _encodable(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_encodable(v) for v in value)
    if isinstance(value, BaseModel):
        return _encodable(value.model_dump())
    return True
