"""Fast validation of decoded records on the ingest hot path, derived from the pydantic models.

Avro decoding already guarantees each field's type, so what is left to check per record are the models' value
constraints: bounds (`ge`, and `le` where the column is narrower than an Avro long), closed sets (`Literal`) and non-blank ids. Those checks are compiled once per kind from
the models' own metadata; a record that fails one goes through pydantic, whose error is the one reported, so pydantic
stays the single authority. Kinds with nested models (checkpoint, run ended: rare events) always use pydantic.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from functools import cache

import annotated_types
from pydantic import BaseModel

from .codec import _is_flat, validate
from .events import EVENT_TYPES, LONG_MAX

Check = Callable[[dict], bool]
_NOT_BLANK = ("run_id", "experiment")  # the models' field_validator(_not_blank)


def _bound_check(name: str, minimum: float) -> Check:
    return lambda record: record.get(name) is None or record[name] >= minimum


def _upper_check(name: str, maximum: float) -> Check:
    return lambda record: record.get(name) is None or record[name] <= maximum


def _choice_check(name: str, choices: frozenset) -> Check:
    return lambda record: record.get(name) in choices


def _literal_choices(annotation: object) -> frozenset | None:
    if typing.get_origin(annotation) is typing.Literal:
        return frozenset(typing.get_args(annotation))
    return None


@cache
def _checks(kind: str) -> tuple[Check, ...] | None:
    model: type[BaseModel] = EVENT_TYPES[kind]
    if not _is_flat(model):
        return None
    checks: list[Check] = []
    for name, field in model.model_fields.items():
        for constraint in field.metadata:
            if isinstance(constraint, annotated_types.Ge):
                checks.append(_bound_check(name, constraint.ge))
            elif isinstance(constraint, annotated_types.Le) and constraint.le < LONG_MAX:  # Avro longs hold no more
                checks.append(_upper_check(name, constraint.le))
        if (choices := _literal_choices(field.annotation)) is not None:
            checks.append(_choice_check(name, choices))
    for name in _NOT_BLANK:
        if name in model.model_fields:
            checks.append(lambda record, n=name: bool(record[n].strip()))
    return tuple(checks)


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
