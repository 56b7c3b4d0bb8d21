"""Frames made without ClickHouse, for tests of what consumes them (writer, detectors): decoded events as the
columnar decoder's frames would hold them, the record index of each being its place in the list given."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pyarrow as pa
from fastavro.schema import to_parsing_canonical_form
from pydantic import BaseModel

from trainwire.consumers.frames import Decoded, Frame, reader_schema
from trainwire.schemas import decode_record, encode
from trainwire.schemas.codec import HEADER_LEN, registry


def decoded_of(events: list[BaseModel]) -> Decoded:
    """`events` (pydantic events, in batch order) as a Decoded batch with no dead letters."""
    return decoded_of_messages([encode(event) for event in events])


def decoded_of_messages(messages: list[bytes]) -> Decoded:
    """Single-object messages of any shipped schema version (in batch order) as a Decoded batch."""
    by_kind: dict[str, list[tuple[int, dict, bytes]]] = defaultdict(list)
    for position, message in enumerate(messages):
        kind, record = decode_record(message)
        by_kind[kind].append((position, record, message))
    frames = {}
    for kind, rows in by_kind.items():
        writers = sorted({to_parsing_canonical_form(registry()[m[2:HEADER_LEN]].parsed) for _, _, m in rows})
        frames[kind] = Frame(
            kind=kind,
            table=pa.Table.from_pylist([record for _, record, _ in rows], schema=reader_schema(kind)),
            positions=np.array([position for position, _, _ in rows], dtype=np.int64),
            bodies=[m[HEADER_LEN:] for _, _, m in rows],
            writer_ids=np.array([writers.index(to_parsing_canonical_form(registry()[m[2:HEADER_LEN]].parsed))
                                 for _, _, m in rows], dtype=np.int32),
            writers=writers,
        )
    return Decoded(frames)
