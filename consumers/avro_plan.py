"""What the columnar decoder knows of one writer schema: the SELECT that has ClickHouse parse its bodies, how to
tell the rows ClickHouse read exactly as fastavro reads them, and how to shape them for the reader schema.

ClickHouse's Avro reader is laxer than fastavro in a few ways: it skips what is left of a block after the row (a
body with trailing bytes), keeps any bytes in a String (invalid UTF-8), keeps a map's duplicate keys, reads a union
branch index it does not know as null, and reads non-minimal encodings. A row is *faithful* when none of that can
have happened: its strings are valid UTF-8, its maps' keys distinct, its minimal encoding is exactly as long as its
body, and every union index byte, found at the offset that encoding gives, is the branch its value is in. Each
element of a body takes at least the bytes of its minimal encoding, so equal lengths mean ClickHouse read every
element minimally, where the offsets say; such a body is valid Avro and fastavro reads the same values from it.
Rows that are not faithful go through the per-record path, which says what they are.

Supported writer schemas are records whose unions are top-level fields of two branches, one of them null, the
other a primitive; anything else (enums, fixed, other unions) is left to the per-record path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from trainwire.schemas.codec import Writer, latest
from trainwire.schemas.ocf import body_starts, varint_lengths

OK_COLUMN = "_trainwire_ok"
PRIMITIVES = frozenset({"boolean", "int", "long", "float", "double", "string", "bytes"})
_FIXED_SIZE = {"null": 0, "boolean": 1, "float": 4, "double": 8}
_PROMOTIONS = {("int", "long"), ("int", "float"), ("int", "double"), ("long", "float"), ("long", "double"),
               ("float", "double"), ("string", "bytes"), ("bytes", "string")}


class Unsupported(ValueError):
    """A writer schema the columnar path does not read; its messages take the per-record path."""


@dataclass(frozen=True)
class _Union:
    field: int  # its place among the record's fields
    null_byte: int  # the encoded branch index of null…
    value_byte: int  # …and of the value


def _branches(avro_type: object) -> tuple[object, bool]:
    """(the non-null type, whether null is allowed) of a field's type."""
    if isinstance(avro_type, list):
        if len(avro_type) != 2 or "null" not in avro_type:
            raise Unsupported(f"union {avro_type}: only [null, T] unions are read as columns")
        (inner,) = [t for t in avro_type if t != "null"]
        if inner not in PRIMITIVES:
            raise Unsupported(f"union {avro_type}: only unions of null and a primitive are read as columns")
        return inner, True
    return avro_type, False


def _check_supported(avro_type: object) -> None:
    if isinstance(avro_type, str):
        if avro_type not in PRIMITIVES and avro_type != "null":
            raise Unsupported(f"type {avro_type}")
        return
    if isinstance(avro_type, list):
        raise Unsupported(f"union {avro_type} below the top level")
    kind = avro_type["type"]
    if kind == "array":
        _check_supported(avro_type["items"])
    elif kind == "map":
        _check_supported(avro_type["values"])
    elif kind == "record":
        for field in avro_type["fields"]:
            _check_supported(field["type"])
    else:
        raise Unsupported(f"type {kind}")


# -- ClickHouse's checks of what it cannot refuse: UTF-8 and map keys --------------------------------------------

def _quote(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def _valid_sql(avro_type: object, ref: str, depth: int = 0) -> str | None:
    """A ClickHouse boolean expression that holds when the value at `ref` is one fastavro would read the same, as
    far as ClickHouse cannot tell by refusing it; None when there is nothing to check."""
    if avro_type == "string":
        return f"isValidUTF8({ref})"
    if isinstance(avro_type, str):
        return None
    var = f"x{depth}"
    kind = avro_type["type"]
    if kind == "array":
        inner = _valid_sql(avro_type["items"], var, depth + 1)
        return f"arrayAll({var} -> {inner}, {ref})" if inner else None
    if kind == "map":
        checks = [f"arrayAll({var} -> isValidUTF8({var}), mapKeys({ref}))",
                  f"arrayUniq(mapKeys({ref})) = length(mapKeys({ref}))"]  # fastavro's dict keeps the last
        inner = _valid_sql(avro_type["values"], var, depth + 1)
        if inner:
            checks.append(f"arrayAll({var} -> {inner}, mapValues({ref}))")
        return " AND ".join(checks)
    checks = [c for f in avro_type["fields"]
              if (c := _valid_sql(f["type"], f"tupleElement({ref}, '{f['name']}')", depth))]
    return " AND ".join(f"({c})" for c in checks) or None


# -- minimal encoded sizes, from the columns ------------------------------------------------------------------------

def _string_lengths(array: pa.Array) -> np.ndarray:
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int32)[array.offset:array.offset + len(array) + 1]
    return np.diff(offsets).astype(np.int64)


def _counted(counts_offsets: np.ndarray, item_sizes: np.ndarray) -> np.ndarray:
    """Sizes of arrays or maps written as one block: count, items, and the closing 0 (a lone 0 when empty)."""
    counts = np.diff(counts_offsets).astype(np.int64)
    summed = np.concatenate(([0], np.cumsum(item_sizes)))
    items = summed[counts_offsets[1:]] - summed[counts_offsets[:-1]]
    return np.where(counts > 0, varint_lengths(counts) + items + 1, 1)


def encoded_sizes(avro_type: object, array: pa.Array) -> np.ndarray | int:
    """The minimal Avro encoding's length of each value of `array` (a non-union type); one number for types of
    one size."""
    if isinstance(avro_type, str):
        if avro_type in _FIXED_SIZE:
            return _FIXED_SIZE[avro_type]
        if avro_type in ("int", "long"):
            return varint_lengths((array.fill_null(0) if array.null_count else array).to_numpy())
        lengths = _string_lengths(array)  # string, bytes
        return varint_lengths(lengths) + lengths
    kind = avro_type["type"]
    offsets = array.offsets.to_numpy() if kind in ("array", "map") else None
    if kind == "array":
        return _counted(offsets, _per_value(encoded_sizes(avro_type["items"], array.values), len(array.values)))
    if kind == "map":
        entries = array.values  # the struct of every entry, whatever the slice
        keys, values = entries.field(0), entries.field(1)
        return _counted(offsets, encoded_sizes("string", keys) + encoded_sizes(avro_type["values"], values))
    sizes = np.zeros(len(array), dtype=np.int64)
    for field, child in zip(avro_type["fields"], array.flatten()):
        sizes += encoded_sizes(field["type"], child)
    return sizes


def _per_value(sizes: np.ndarray | int, count: int) -> np.ndarray:
    return sizes if isinstance(sizes, np.ndarray) else np.full(count, sizes, dtype=np.int64)


# -- the reader's shape ----------------------------------------------------------------------------------------------

def _resolvable(writer: object, reader: object) -> bool:
    """Whether Avro resolution of `writer` data as `reader` is a plain Arrow cast (no per-value failures)."""
    writer_null, reader_null = isinstance(writer, list), isinstance(reader, list)
    writer, reader = _non_null(writer), _non_null(reader)
    if writer_null and not reader_null:  # a null would fail resolution: per-record path
        return False
    if isinstance(writer, str) or isinstance(reader, str):
        return writer == reader or (writer, reader) in _PROMOTIONS
    if writer["type"] != reader["type"]:
        return False
    if writer["type"] == "array":
        return _resolvable(writer["items"], reader["items"])
    if writer["type"] == "map":
        return _resolvable(writer["values"], reader["values"])
    if writer["type"] == "record":  # nested records: the same fields in the same order
        return [f["name"] for f in writer["fields"]] == [f["name"] for f in reader["fields"]] and all(
            _resolvable(w["type"], r["type"]) for w, r in zip(writer["fields"], reader["fields"]))
    return False


def _arrow_default(value: object, avro_type: object) -> object:
    """An Avro JSON default as the Python value pyarrow takes for the field's type (a map as pairs)."""
    inner = _non_null(avro_type)
    if isinstance(inner, dict) and inner["type"] == "map" and value is not None:
        return list(value.items())
    return value


def _names(avro_type: object) -> str:
    return json.dumps(avro_type, sort_keys=True)


def _non_null(avro_type: object) -> object:
    return _branches(avro_type)[0] if isinstance(avro_type, list) else avro_type


class WriterPlan:
    """How the messages of one writer schema are parsed, verified and shaped for the newest schema of their kind.

    Raises Unsupported when the writer schema is not one the columnar path reads."""

    def __init__(self, writer: Writer, reader: pa.Schema):
        self.kind = writer.kind
        self.reader = reader  # the Arrow schema of its frames (frames.reader_schema)
        self.schema_json = writer.schema_json
        schema = json.loads(writer.schema_json)
        if not isinstance(schema, dict) or schema.get("type") != "record":
            raise Unsupported("the writer schema is not a record")
        self._fields = schema["fields"]
        self._unions: list[_Union] = []
        self._types: list[object] = []
        for i, field in enumerate(self._fields):
            inner, nullable = _branches(field["type"])
            _check_supported(inner)
            self._types.append(inner)
            if nullable:
                null_index = field["type"].index("null")
                self._unions.append(_Union(i, null_index * 2, (1 - null_index) * 2))  # zig-zag of 0 and 1
        checks = [c for f, t in zip(self._fields, self._types)
                  if (c := _valid_sql(t, f"assumeNotNull({_quote(f['name'])})" if isinstance(f["type"], list)
                                      else _quote(f["name"])))]
        self.select = ", ".join([_quote(f["name"]) for f in self._fields]
                                + [f"{' AND '.join(f'({c})' for c in checks) or '1'} AS {OK_COLUMN}"])
        self._reader = self._reader_columns(latest(self.kind).parsed["fields"])

    def _reader_columns(self, reader_fields: list[dict]) -> list[tuple[str, str | None, object, bool]]:
        """Per reader field: (its name, the writer field it is read from or None, the default it takes when there
        is none, whether reading it promotes the writer's type, e.g. int to long)."""
        by_name = {f["name"]: f for f in self._fields}
        columns = []
        for field in reader_fields:
            source = by_name.get(field["name"])
            if source is None:
                if "default" not in field:
                    raise Unsupported(f"the reader's field {field['name']} has no default and the writer lacks it")
                columns.append((field["name"], None, _arrow_default(field["default"], field["type"]), False))
                continue
            if not _resolvable(source["type"], field["type"]):
                raise Unsupported(f"field {field['name']}: writer type {source['type']} read as {field['type']}")
            promoted = _names(_non_null(source["type"])) != _names(_non_null(field["type"]))
            columns.append((field["name"], source["name"], None, promoted))
        return columns

    def faithful(self, table: pa.Table, container: bytes, body_lengths: np.ndarray) -> np.ndarray:
        """Per row of `table` (ClickHouse's parse of `container`, whose bodies have these lengths, in order): whether
        ClickHouse read it exactly as fastavro would (see the module's docstring)."""
        if not len(table):
            return np.ones(0, dtype=bool)
        ok = table.column(OK_COLUMN).to_numpy().astype(bool)
        size = np.zeros(len(table), dtype=np.int64)  # of the fields so far: the next field's offset in its body
        union_bytes: list[tuple[np.ndarray, np.ndarray | int]] = []  # (offset, the index byte it must hold)
        unions = {union.field: union for union in self._unions}
        for i, (field, avro_type) in enumerate(zip(self._fields, self._types)):
            column = table.column(field["name"])
            sizes = encoded_sizes(avro_type, column.chunk(0)) if column.num_chunks == 1 else np.concatenate(
                [_per_value(encoded_sizes(avro_type, chunk), len(chunk)) for chunk in column.chunks])
            if i in unions:
                union = unions[i]
                if column.null_count:
                    valid = column.is_valid().to_numpy(zero_copy_only=False)
                    union_bytes.append((size.copy(), np.where(valid, union.value_byte, union.null_byte)))
                    sizes = np.where(valid, sizes + 1, 1)
                else:
                    union_bytes.append((size.copy(), union.value_byte))
                    sizes = sizes + 1
            size += sizes
        ok &= size == body_lengths
        if union_bytes:
            data = np.frombuffer(container, dtype=np.uint8)
            starts = body_starts(len(container), body_lengths)
            for offsets, expected in union_bytes:
                ok &= data[np.minimum(starts + offsets, len(data) - 1)] == expected
        return ok

    def to_reader(self, table: pa.Table) -> pa.Table:
        """ClickHouse's columns of this writer shaped as the reader's: fields the writer lacks hold the
        reader's default, fields the reader lacks are dropped, types cast (Avro's promotions included)."""
        if not len(table):
            return self.reader.empty_table()
        columns = []
        for (name, source, default, promoted), target in zip(self._reader, self.reader):
            if source is None:
                columns.append(pa.nulls(len(table), target.type) if default is None
                               else pa.repeat(pa.scalar(default, target.type), len(table)))
            else:
                columns.append(table.column(source).cast(target.type, safe=not promoted))
        return pa.Table.from_arrays(columns, schema=self.reader)
