"""A batch of records as columns: ClickHouse parses the Avro bodies of a whole batch at once, and checks, de-duplication,
detectors and the insert all work on the columns (see docs/ingest.md). What cannot be parsed or checked goes to the
dead letters with its reason, record by record, while the rest of the batch goes on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

import numpy as np
import pyarrow as pa

from trainwire.schemas.codec import latest


@dataclass
class Frame:
    """One kind's admitted events of a batch, as columns.

    `table` is reader-shaped: exactly the fields of the newest schema of `kind`, by their Avro names (`ts_ms`, not
    the table's `ts`), one row per admitted event, in batch order; fields an older writer lacks hold the reader's
    default. The other members are parallel to its rows."""

    kind: str
    table: pa.Table
    positions: np.ndarray  # int64: the index of each row's record in the batch's record list, ascending
    bodies: list[bytes]  # each row's Avro binary body (the message without the codec's header)
    writer_ids: np.ndarray  # int32: each row's writer schema, an index into `writers`
    writers: list[str]  # writer schemas as JSON text


@dataclass
class Decoded:
    frames: dict[str, Frame] = field(default_factory=dict)  # by kind
    dead_letters: list[tuple[int, str]] = field(default_factory=list)  # (record index, reason), in record order


def _arrow_type(avro: object) -> tuple[pa.DataType, bool]:
    """(Arrow type, nullable) of an Avro type as the reader sees it."""
    if isinstance(avro, list):  # a union: trainwire's are ["null", T]
        (inner,) = [t for t in avro if t != "null"]
        return _arrow_type(inner)[0], True
    if isinstance(avro, dict):
        if avro["type"] == "map":
            return pa.map_(pa.string(), _arrow_type(avro["values"])[0]), False
        if avro["type"] == "array":
            return pa.list_(_arrow_type(avro["items"])[0]), False
        if avro["type"] == "record":
            return pa.struct([pa.field(f["name"], *_arrow_type(f["type"])) for f in avro["fields"]]), False
        return _arrow_type(avro["type"])
    return _PRIMITIVES[avro], False


_PRIMITIVES = {"string": pa.string(), "long": pa.int64(), "int": pa.int32(), "double": pa.float64(),
               "float": pa.float32(), "boolean": pa.bool_(), "bytes": pa.binary()}


@cache
def reader_schema(kind: str) -> pa.Schema:
    """The Arrow schema of a Frame's table for `kind`: the newest Avro schema's fields, names and types."""
    return pa.schema([pa.field(f["name"], *_arrow_type(f["type"])) for f in latest(kind).parsed["fields"]])
