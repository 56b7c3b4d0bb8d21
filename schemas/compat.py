"""The schema-evolution policy (docs/schema-evolution.md), checked mechanically on two versions of a record.

A new version may add fields with a default, drop fields that had one, and change a type only by an Avro
promotion, so that old messages decode with the new reader and new messages with the old one.
"""

from __future__ import annotations

from typing import Any

from fastavro.validation import validate

PROMOTIONS = frozenset({
    ("int", "long"), ("int", "float"), ("int", "double"), ("long", "float"), ("long", "double"),
    ("float", "double"), ("string", "bytes"), ("bytes", "string"),
})
Schema = Any  # a type in Avro's JSON form: a name, a list (union) or an object


def evolution_problems(old: dict, new: dict) -> list[str]:
    """What breaks the policy when record schema `new` follows `old` (both as JSON); empty when nothing does."""
    if old["name"] != new["name"]:
        return [f"record renamed {old['name']!r} -> {new['name']!r}"]
    old_fields = {f["name"]: f for f in old["fields"]}
    new_fields = {f["name"]: f for f in new["fields"]}
    problems = [problem for field in new["fields"] if (problem := _default_problem(field))]
    for name, field in new_fields.items():
        if name not in old_fields and "default" not in field:
            problems.append(f"added field {name!r} has no default")
    for name, field in old_fields.items():
        if name not in new_fields:
            if "default" not in field:
                problems.append(f"removed field {name!r} had no default")
        elif not promotes(field["type"], new_fields[name]["type"]):
            problems.append(f"field {name!r} changes type {field['type']!r} -> {new_fields[name]['type']!r}, "
                            "which is not an Avro promotion")
    return problems


def promotes(writer: Schema, reader: Schema) -> bool:
    """Whether data written as `writer` resolves to `reader`: the same type, or one Avro promotes it to."""
    if writer == reader:
        return True
    if isinstance(reader, list):
        branches = writer if isinstance(writer, list) else [writer]
        return all(any(promotes(branch, option) for option in reader) for branch in branches)
    if isinstance(writer, list):
        return False  # a union narrowed to a single type
    kind, reader_kind = _kind(writer), _kind(reader)
    if (kind, reader_kind) in PROMOTIONS:
        return True
    if kind != reader_kind or not isinstance(writer, dict) or not isinstance(reader, dict):
        return False
    if kind == "array":
        return promotes(writer["items"], reader["items"])
    if kind == "map":
        return promotes(writer["values"], reader["values"])
    if kind == "record":
        return not evolution_problems(writer, reader)
    return False  # enum and fixed: any change is a break


def _kind(schema: Schema) -> str:
    return schema if isinstance(schema, str) else schema["type"]


def _default_problem(field: dict) -> str | None:
    """Avro requires a union's default to be of its first branch (so optional fields list "null" first)."""
    if "default" not in field:
        return None
    schema = field["type"][0] if isinstance(field["type"], list) else field["type"]
    if isinstance(schema, str) and "." in schema:
        return None  # a named type defined elsewhere: fastavro checks the default when it parses the file
    if not validate(field["default"], schema, raise_errors=False):
        return f"default of field {field['name']!r} is not a {_kind(schema)}"
    return None
