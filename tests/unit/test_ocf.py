"""Object container files made from bodies already encoded: any Avro reader reads them back, and each body lies
where `body_starts` says (the columnar decoder reads union index bytes there)."""

import io
import math

import fastavro
import numpy as np
import pytest
from fastavro.schema import to_parsing_canonical_form

from trainwire.schemas import Step, encode
from trainwire.schemas.codec import HEADER_LEN, latest
from trainwire.schemas.ocf import body_starts, container, varint, varint_lengths

LONG_EDGES = [0, 1, -1, 63, -64, 64, -65, 8191, 8192, 2**31 - 1, -(2**31), 2**62, 2**63 - 1, -(2**63)]


def step_body(i: int, **fields) -> bytes:
    return encode(Step(run_id=f"run-{i}", experiment="x", seq=i, step=i, loss=math.nan, **fields))[HEADER_LEN:]


def schema_json() -> str:
    return to_parsing_canonical_form(latest("step").parsed)


def test_an_avro_reader_reads_every_body_back_in_order():
    bodies = [step_body(i) for i in range(50)]
    records = list(fastavro.reader(io.BytesIO(container(schema_json(), bodies))))
    assert [r["run_id"] for r in records] == [f"run-{i}" for i in range(50)]
    assert all(math.isnan(r["loss"]) for r in records)


def test_a_body_larger_than_the_prepared_prefixes_is_framed_too():
    big = step_body(0, extra={f"metric_{i}": float(i) for i in range(2_000)})
    assert len(big) > 16_384
    (record,) = fastavro.reader(io.BytesIO(container(schema_json(), [big])))
    assert len(record["extra"]) == 2_000


def test_an_empty_container_is_valid():
    assert list(fastavro.reader(io.BytesIO(container(schema_json(), [])))) == []


def test_each_body_lies_where_body_starts_says():
    bodies = [step_body(i, extra={"x": 1.0} if i % 3 else {}) for i in range(20)] + [b"", b"\x00" * 70]
    data = container(schema_json(), bodies)
    starts = body_starts(len(data), np.array([len(b) for b in bodies]))
    assert [data[s:s + len(b)] for s, b in zip(starts, bodies)] == bodies


def test_two_containers_have_different_sync_markers():
    """A body cannot be made to hold the marker that ends its block."""
    assert container(schema_json(), [])[-16:] != container(schema_json(), [])[-16:]


@pytest.mark.parametrize("value", LONG_EDGES)
def test_varint_is_avros_long_encoding(value):
    out = io.BytesIO()
    fastavro.schemaless_writer(out, {"type": "long"}, value)
    assert varint(value) == out.getvalue()


def test_varint_lengths_are_the_lengths_of_the_encodings():
    values = np.array(LONG_EDGES, dtype=np.int64)
    assert varint_lengths(values).tolist() == [len(varint(v)) for v in LONG_EDGES]
    assert varint_lengths(np.array([], dtype=np.int64)).tolist() == []
