"""Fast validation of decoded records on the ingest hot path, derived from the pydantic models.

Avro decoding already guarantees each field's type, so what is left to check per record are the models' value
constraints: bounds (`ge`, and `le` where the column is narrower than an Avro long), closed sets (`Literal`) and
non-blank ids. Those constraints are compiled once per kind from the models' own metadata, into checks of one record
(`check_record`) and of a batch's columns (`failing_rows`, for the columnar decoder); a record that fails one goes
through pydantic, whose error is the one reported, so pydantic stays the single authority. Kinds with nested models
(checkpoint, run ended: rare events) always use pydantic.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import annotated_types
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel

from .codec import _is_flat, validate
from .events import EVENT_TYPES, LONG_MAX

Check = Callable[[dict], bool]
_NOT_BLANK = ("run_id", "experiment")  # the models' field_validator(_not_blank)


@dataclass(frozen=True)
class Constraint:
    """One value constraint of a model's field, as the models declare it."""

    field: str
    op: typing.Literal["ge", "le", "in", "not_blank"]
    value: object = None


def _literal_choices(annotation: object) -> frozenset | None:
    if typing.get_origin(annotation) is typing.Literal:
        return frozenset(typing.get_args(annotation))
    return None


@cache
def constraints(kind: str) -> tuple[Constraint, ...] | None:
    """The constraints of `kind`'s model left to check after Avro decoding; None for models with nested models."""
    model: type[BaseModel] = EVENT_TYPES[kind]
    if not _is_flat(model):
        return None
    found: list[Constraint] = []
    for name, field in model.model_fields.items():
        for constraint in field.metadata:
            if isinstance(constraint, annotated_types.Ge):
                found.append(Constraint(name, "ge", constraint.ge))
            elif isinstance(constraint, annotated_types.Le) and constraint.le < LONG_MAX:  # Avro longs hold no more
                found.append(Constraint(name, "le", constraint.le))
        if (choices := _literal_choices(field.annotation)) is not None:
            found.append(Constraint(name, "in", choices))
    found += [Constraint(name, "not_blank") for name in _NOT_BLANK if name in model.model_fields]
    return tuple(found)


def _record_check(constraint: Constraint) -> Check:
    name, value = constraint.field, constraint.value
    if constraint.op == "ge":
        return lambda record: record.get(name) is None or record[name] >= value
    if constraint.op == "le":
        return lambda record: record.get(name) is None or record[name] <= value
    if constraint.op == "in":
        return lambda record: record.get(name) in value
    return lambda record: bool(record[name].strip())


@cache
def _checks(kind: str) -> tuple[Check, ...] | None:
    found = constraints(kind)
    return None if found is None else tuple(_record_check(c) for c in found)


def check_record(kind: str, record: dict) -> None:
    """Raise InvalidEventError (pydantic's message) unless the decoded record is a valid event of `kind`."""
    checks = _checks(kind)
    if checks is None:
        validate(kind, record)
        return
    for check in checks:  # a loop, not all(<generator>): a generator per record costs as much as the checks
        if not check(record):
            validate(kind, record)
            return


def _blank(column: pa.ChunkedArray) -> np.ndarray:
    """Where a string is blank to `str.strip()`. A batch holds few distinct run ids and experiments, so each
    distinct value is judged once, in Python, by the same `strip` the models use."""
    encoded = column.combine_chunks().dictionary_encode()
    blank = np.array([not text.decode("utf-8", "replace").strip() for text in
                      encoded.dictionary.cast(pa.binary()).to_pylist()], dtype=bool)
    return blank[encoded.indices.to_numpy()] if len(blank) else np.zeros(len(column), dtype=bool)


def _failing(constraint: Constraint, column: pa.ChunkedArray) -> np.ndarray:
    if constraint.op == "not_blank":
        return _blank(column)
    if constraint.op == "in":
        passing = pc.is_in(column, value_set=pa.array(sorted(constraint.value)))
    else:  # a null passes; NaN fails, as `record[name] >= value` does
        compare = pc.greater_equal if constraint.op == "ge" else pc.less_equal
        passing = pc.fill_null(compare(column, constraint.value), True)
    return ~passing.to_numpy(zero_copy_only=False).astype(bool)


def failing_rows(kind: str, table: pa.Table) -> np.ndarray:
    """The columnar form of `check_record`: which rows of a reader-shaped `kind` table fail it, or may (a row
    flagged here is judged by `check_record`, whose error is the one reported).

    Compiled from the same constraints; kinds with nested models (rare events) are validated row by row."""
    found = constraints(kind)
    if found is None:
        return np.array([_fails(kind, row) for row in _records(table)], dtype=bool)
    failing = np.zeros(table.num_rows, dtype=bool)
    for constraint in found:
        failing |= _failing(constraint, table.column(constraint.field))
    return failing


def _records(table: pa.Table) -> list[dict]:
    """Rows as decoded records: maps as dicts, as fastavro gives them."""
    maps = [f.name for f in table.schema if pa.types.is_map(f.type)]
    rows = table.to_pylist()
    for row in rows:
        for name in maps:
            row[name] = dict(row[name])
    return rows


def _fails(kind: str, record: dict) -> bool:
    try:
        check_record(kind, record)
    except Exception:  # InvalidEventError, or a check tripped: the per-record path says which
        return True
    return False
