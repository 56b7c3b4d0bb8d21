"""Property tests: for every event kind and both wire formats, decode(encode(event)) is the event.

The strategies are built from the pydantic models' fields (types, `ge` bounds, patterns, Literal choices) and the
Avro schemas (`int` is 32-bit, `long` 64-bit), so a new field is covered without touching this file, and a field of
a type the builder does not know fails here loudly.
"""

import math
import types
import typing

import annotated_types
import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient
from hypothesis import HealthCheck, given, settings, strategies as st
from pydantic import BaseModel

from trainwire.schemas import EVENT_TYPES, SingleObjectCodec, decode
from trainwire.schemas.codec import latest
from trainwire.schemas.confluent import ConfluentCodec

NON_BLANK = {"run_id", "experiment"}  # Event._not_blank
INT_BITS = {"int": 32, "long": 64}
NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])
PATTERNS = {  # faster than st.from_regex for the same strings
    r"^sha256:[0-9a-f]{64}$": st.binary(min_size=32, max_size=32).map(lambda b: "sha256:" + b.hex()),
}
CODECS = {
    "single-object": SingleObjectCodec(),
    "confluent": ConfluentCodec("mock://properties",
                                client=SchemaRegistryClient.new_client({"url": "mock://properties"})),
}


def _without_null(avro_type):
    if isinstance(avro_type, list):
        (avro_type,) = [t for t in avro_type if t != "null"]
    return avro_type


def _field(name: str, annotation, metadata: list, avro_type) -> st.SearchStrategy:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return st.none() | _field(name, inner, metadata, _without_null(avro_type))
    ge = next((m.ge for m in metadata if isinstance(m, annotated_types.Ge)), None)
    le = next((m.le for m in metadata if isinstance(m, annotated_types.Le)), None)
    pattern = next((m.pattern for m in metadata if getattr(m, "pattern", None)), None)
    if origin is typing.Literal:
        return st.sampled_from(args)
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        bits = INT_BITS[avro_type]
        return st.integers(-(2 ** (bits - 1)) if ge is None else ge, min(2 ** (bits - 1) - 1, le or math.inf))
    if annotation is float:  # NaN and ±Inf are legal metric values (drawn often), except where a bound excludes them
        finite = st.floats(allow_nan=False, allow_infinity=False, min_value=ge)
        return (NON_FINITE if ge is None else st.just(math.inf)) | finite
    if annotation is str:
        if pattern:
            return PATTERNS[pattern] if pattern in PATTERNS else st.from_regex(pattern, fullmatch=True)
        return st.text(max_size=20).filter(str.strip) if name in NON_BLANK else st.text(max_size=20)
    if origin is dict and args[0] is str:
        return st.dictionaries(st.text(max_size=8), _field(name, args[1], [], avro_type["values"]), max_size=4)
    if origin is list:
        return st.lists(_field(name, args[0], [], avro_type["items"]), max_size=3)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return model_strategy(annotation, avro_type)
    raise TypeError(f"no strategy for field {name}: {annotation!r}; teach test_codec_properties._field")


def model_strategy(model: type[BaseModel], avro_record: dict) -> st.SearchStrategy:
    avro_types = {f["name"]: f["type"] for f in avro_record["fields"]}
    return st.builds(model, **{name: _field(name, info.annotation, info.metadata, avro_types[name])
                               for name, info in model.model_fields.items()})


STRATEGIES = {kind: model_strategy(model, latest(kind).parsed) for kind, model in EVENT_TYPES.items()}


def same(a, b) -> bool:
    """Equality in which NaN equals NaN, -0.0 differs from 0.0 and types must match (True is not 1)."""
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def test_every_kind_has_a_strategy():
    assert sorted(STRATEGIES) == sorted(EVENT_TYPES) and len(EVENT_TYPES) >= 8


@pytest.mark.parametrize("kind", sorted(EVENT_TYPES))
def test_decode_inverts_encode_in_both_formats(kind):
    @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(STRATEGIES[kind])
    def round_trips(event):
        for name, codec in CODECS.items():
            back = decode(codec.encode(event), codec)
            assert type(back) is type(event), name
            assert same(back.model_dump(), event.model_dump()), name

    round_trips()
