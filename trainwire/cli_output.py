"""How the CLI prints: tables with a header and aligned columns for people, one JSON representation for programs.

JSON (README, "JSON output"): a missing value is `null`, never the text "None"; a non-finite number is one of the
strings "NaN", "Infinity", "-Infinity" (JSON has no literal for them, and a bare `NaN` token breaks most parsers);
times are ISO 8601 UTC. The read API (`trainwire.infra.store.api.to_json`) uses the same spelling, so what
`trainwire up` answers and what a store opened here answers print alike. This module imports nothing of the store:
a producer-only install prints JSON too.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import Any

MISSING = "-"  # a table cell with no value: never "None"
NO_STAGE = "None"  # the registry's name for "not yet in the registry" (consumers/governance/registry.py)


def json_value(value: Any) -> Any:
    """A JSON-safe copy: non-finite floats as "NaN"/"Infinity"/"-Infinity", times ISO 8601 UTC, tuples as lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def json_text(value: Any, compact: bool = True) -> str:
    """The one JSON rendering every command prints (`allow_nan=False`: a NaN that slipped through is a bug here)."""
    return json.dumps(json_value(value), allow_nan=False, indent=None if compact else 2)


def stage_value(stage: str | None) -> str | None:
    """A registry stage for JSON: the registry's "None" (no stage yet) is null, as any other missing value."""
    return None if stage in (None, NO_STAGE) else stage


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def cell(value: Any) -> str:
    """How a value reads in a table: missing as "-", non-finite numbers spelt out, floats to 4 significant digits,
    times to the second in UTC, control characters escaped (an event field cannot move the cursor or fake a row)."""
    if value is None or value == "":
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return json_value(value)
        return f"{value:.4g}"
    if isinstance(value, datetime):
        return (value.astimezone(timezone.utc) if value.tzinfo else value).strftime("%Y-%m-%d %H:%M:%S")
    text = str(value)
    if re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)?", text):  # ISO times from the API
        return cell(datetime.fromisoformat(text.replace("Z", "+00:00")))
    return _CONTROL.sub(lambda m: m[0].encode("unicode_escape").decode("ascii"), text)


@dataclass(frozen=True)
class Column:
    """A table column: its header, how a row gives its value, and whether it is right-aligned (numbers)."""
    header: str
    value: Callable[[dict[str, Any]], Any]
    right: bool = False


def column(header: str, key: str | None = None, right: bool = False) -> Column:
    """A column reading `row[key]` (default: the header, lower-cased, spaces as underscores)."""
    name = key or header.lower().replace(" ", "_")
    return Column(header, lambda row: row.get(name), right)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[Column], empty: str) -> str:
    """Rows under a header, each column as wide as its widest cell; `empty` when there are no rows."""
    if not rows:
        return empty
    cells = [[c.header for c in columns]] + [[cell(c.value(row)) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    last = len(columns) - 1
    return "\n".join(
        "  ".join(text.rjust(width) if c.right else (text if i == last else text.ljust(width))
                  for i, (text, width, c) in enumerate(zip(line, widths, columns)))
        for line in cells)


def key_values(pairs: Sequence[tuple[str, Any]]) -> str:
    """Labelled values, one a line, the labels right-aligned: how one record reads."""
    width = max((len(label) for label, _ in pairs), default=0)
    return "\n".join(f"{label:>{width}}  {cell(value)}" for label, value in pairs)
