"""A batch of records as columns: ClickHouse parses the Avro bodies of a whole batch at once, and checks, de-duplication,
detectors and the insert all work on the columns (see docs/ingest.md). What cannot be parsed or checked goes to the
dead letters with its reason, record by record, while the rest of the batch goes on.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cache

import numpy as np
import pyarrow as pa

from trainwire.infra.config import Settings
from trainwire.infra.log import Record
from trainwire.schemas import Codec, CodecUnavailableError, CorruptPayloadError, SchemaError
from trainwire.schemas.checks import check_record, failing_rows
from trainwire.schemas.codec import Writer, latest
from trainwire.schemas.ocf import container

from .admission import Admission
from .avro_parser import AvroParser, AvroRefusedError, ParserUnavailableError
from .avro_plan import Unsupported, WriterPlan

log = logging.getLogger(__name__)
# A refused part of a group this small is judged body by body by the per-record path rather than halved further.
_JUDGED_ONE_BY_ONE = 256


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


# -- the columnar decoder ----------------------------------------------------------------------------------------

Decision = tuple[str, dict] | SchemaError  # what the per-record path makes of one record


def decode_one(codec: Codec, admission: Admission, record: Record, now_ms: int) -> Decision:
    """The per-record path: the record as a checked event (kind, fields), or why it cannot be one. The columnar
    decoder sends every record it cannot vouch for through here, so their dead letters read as they always did;
    only an unreachable schema registry is raised (retried), never a record's own failure."""
    try:
        if record.value is None:
            raise CorruptPayloadError("null value (a tombstone): trainwire events are never deleted by key")
        kind, fields = codec.decode_record(record.value)
        admission.check(record.topic, kind, fields, now_ms)
        check_record(kind, fields)
    except CodecUnavailableError:
        raise
    except SchemaError as err:
        return err
    except Exception as err:  # a codec or check tripped on something no test foresaw
        return CorruptPayloadError(f"cannot decode the record: {err!r}")
    return kind, fields


def reason_of(error: SchemaError) -> str:
    """A dead letter's reason, as the per-record path words it."""
    return f"{type(error).__name__}: {error}"


@dataclass
class _Group:
    """The messages of one batch written with one writer schema on one topic, and where each sits in the batch."""

    writer: Writer
    topic: str
    positions: list[int] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)  # the messages without their headers


@dataclass
class _Parsed:
    """ClickHouse's reading of some bodies of a group: `table` holds the faithful ones, reader-shaped."""

    indices: np.ndarray  # into the group, one per body parsed
    faithful: np.ndarray  # per body parsed
    table: pa.Table


@dataclass
class _Rows:
    """Admitted rows of one kind from one writer, before the kind's rows are joined in batch order."""

    positions: np.ndarray
    table: pa.Table
    bodies: list[bytes]
    writer: str


class FrameDecoder:
    """A batch of records into frames: ClickHouse parses each writer schema's bodies at once, admission and the
    models' checks run as masks over the columns, and only the records they cannot vouch for take the per-record
    path (`decode_one`), which says what they are. Every record ends as a frame row or a dead letter.

    Per record only the header is read (the codec's `writer_of`); the rest is per writer schema or per kind."""

    def __init__(self, codec: Codec, settings: Settings, parser: AvroParser):
        self._codec = codec
        self._admission = Admission(settings)
        self._parser = parser
        self._plans: dict[bytes, WriterPlan | None] = {}  # by writer fingerprint; None: the per-record path
        self._header_lengths: tuple[int, ...] = ()  # of the messages' headers seen: their bytes decide the writer
        self._failures = 0  # groups ClickHouse could not parse for reasons other than their data

    def decode(self, records: list[Record], now_ms: int) -> Decoded:
        dead: list[tuple[int, str]] = []
        rows: dict[str, list[_Rows]] = defaultdict(list)
        for group in self._groups(records, now_ms, dead):
            self._decode_group(group, records, now_ms, rows, dead)
        dead.sort()
        return Decoded({kind: _frame(kind, parts) for kind, parts in rows.items()}, dead)

    def _groups(self, records: list[Record], now_ms: int, dead: list[tuple[int, str]]) -> list[_Group]:
        """The records by topic and writer schema. A message's header decides its writer, so the codec is asked
        once per distinct header and topic (`writer_of`); the rest is a lookup of the header's bytes."""
        groups: dict[tuple[str, bytes], _Group] = {}
        by_topic: dict[str, dict[bytes, _Group]] = {}  # topic → a message header seen on it → its group
        for position, record in enumerate(records):
            value, topic = record.value, record.topic
            headers = by_topic.get(topic)
            if headers is None:
                headers = by_topic[topic] = {}
            group = None
            if value is not None:
                for length in self._header_lengths:  # one, but a Confluent codec reads single-object messages too
                    group = headers.get(value[:length])
                    if group is not None:
                        break
            if group is None:
                writer = self._writer_of(record, position, now_ms, dead)
                if writer is None:
                    continue
                length = writer.header_len
                group = groups.get((topic, writer.group_key))
                if group is None:
                    group = groups[topic, writer.group_key] = _Group(writer, topic)
                headers[value[:length]] = group
            group.positions.append(position)
            group.bodies.append(value[length:])
        return list(groups.values())

    def _writer_of(self, record: Record, position: int, now_ms: int, dead: list[tuple[int, str]]) -> Writer | None:
        """The record's writer from the codec; None when its header is refused (then the per-record path words its
        dead letter: decode_record refuses the same headers)."""
        try:
            writer = self._codec.writer_of(record.value)  # a tombstone (None) raises too
        except CodecUnavailableError:
            raise
        except Exception as err:
            decision = decode_one(self._codec, self._admission, record, now_ms)
            if not isinstance(decision, SchemaError):  # the codec contradicts itself: still one place per record
                decision = CorruptPayloadError(f"cannot name the record's writer schema: {err!r}")
            dead.append((position, reason_of(decision)))
            return None
        if writer.header_len not in self._header_lengths:
            self._header_lengths = tuple(sorted({*self._header_lengths, writer.header_len}))
        return writer

    def _decide(self, record: Record, position: int, now_ms: int, dead: list[tuple[int, str]],
                admitted: list[tuple[int, dict]], decision: Decision | None = None) -> None:
        """The per-record path's verdict on one record: a dead letter, or an admitted record."""
        if decision is None:
            decision = decode_one(self._codec, self._admission, record, now_ms)
        if isinstance(decision, SchemaError):
            dead.append((position, reason_of(decision)))
        else:
            admitted.append((position, decision[1]))

    def _plan(self, writer: Writer) -> WriterPlan | None:
        if writer.group_key not in self._plans:
            try:
                self._plans[writer.group_key] = WriterPlan(writer, reader_schema(writer.kind))
            except Unsupported as why:
                log.warning("ingest: %s messages of writer schema %s take the per-record path: %s", writer.kind,
                            writer.group_key.hex(), why)
                self._plans[writer.group_key] = None
        return self._plans[writer.group_key]

    def _decode_group(self, group: _Group, records: list[Record], now_ms: int, rows: dict[str, list[_Rows]],
                      dead: list[tuple[int, str]]) -> None:
        writer, kind = group.writer, group.writer.kind
        accepted = self._admission.accepts(group.topic, kind)  # else the per-record path says why not
        plan = self._plan(writer) if accepted else None
        bodies = group.bodies
        refer = np.zeros(len(bodies), dtype=bool) if plan else np.ones(len(bodies), dtype=bool)
        positions = np.array(group.positions, dtype=np.int64)
        known: dict[int, Decision] = {}  # per-record decisions made while isolating a refused container
        if plan is not None:
            for parsed in self._parse_or_refer(plan, group, records, known, now_ms, refer, dead):
                refer[parsed.indices[~parsed.faithful]] = True
                indices = parsed.indices[parsed.faithful]
                passing = self._passing(kind, parsed.table, now_ms)
                refer[indices[~passing]] = True
                kept = indices[passing]
                if len(kept):
                    table = parsed.table if passing.all() else parsed.table.filter(passing)
                    kept_bodies = bodies if len(kept) == len(bodies) else [bodies[i] for i in kept]
                    rows[kind].append(_Rows(positions[kept], table, kept_bodies, writer.schema_json))
        admitted: list[tuple[int, dict]] = []
        for i in np.flatnonzero(refer):
            position = group.positions[i]
            self._decide(records[position], position, now_ms, dead, admitted, known.get(i))
        if admitted:
            where = {position: i for i, position in enumerate(group.positions)}
            rows[kind].append(_Rows(np.array([p for p, _ in admitted], dtype=np.int64),
                                    pa.Table.from_pylist([fields for _, fields in admitted], schema=reader_schema(kind)),
                                    [bodies[where[p]] for p, _ in admitted], writer.schema_json))

    def _parse_or_refer(self, plan: WriterPlan, group: _Group, records: list[Record], known: dict[int, Decision],
                        now_ms: int, refer: np.ndarray, dead: list[tuple[int, str]]) -> list[_Parsed]:
        """ClickHouse's reading of the group, or, when ClickHouse fails for a reason other than the data (memory,
        disk, a query it cannot run for this writer schema), none: the per-record path then decodes the whole group,
        slower but the same, so the failure costs time and never a record."""
        refused: list[tuple[int, str]] = []  # dead letters the parse found; kept only if it went through
        try:
            parsed = self._parse(plan, group, records, group.bodies, known, now_ms, refused)
        except ParserUnavailableError as err:
            self._failures += 1
            if self._failures in (1, 10) or self._failures % 100 == 0:
                log.warning("ingest: ClickHouse could not parse %d %s messages, decoded one by one instead (%d "
                            "times so far): %s", len(group.bodies), plan.kind, self._failures, err)
            refer[:] = True
            return []
        dead += refused
        return parsed

    def _passing(self, kind: str, table: pa.Table, now_ms: int) -> np.ndarray:
        """Rows that pass admission's date window and the models' checks, on columns."""
        failing = self._admission.outside_window(table.column("ts_ms").to_numpy(), now_ms)
        return ~(failing | failing_rows(kind, table))

    def _parse(self, plan: WriterPlan, group: _Group, records: list[Record], bodies: list[bytes],
               known: dict[int, Decision], now_ms: int, dead: list[tuple[int, str]]) -> list[_Parsed]:
        """ClickHouse's reading of the group's bodies. A refused container is halved until the refused parts are
        small; the per-record path then judges their bodies (its dead letters are today's) and the rest is parsed
        again. A body ClickHouse alone refuses (halved down to itself) is a dead letter with ClickHouse's reason.

        Halving first: each parse costs a few milliseconds, the per-record path ~10 µs a body, so one truncated body
        in a poll costs some twenty parses instead of the whole group through fastavro."""
        parsed: list[_Parsed] = []
        pending = [np.arange(len(bodies))]
        while pending:
            part = pending.pop()
            try:
                parsed.append(self._parse_bodies(plan, bodies, part))
                continue
            except AvroRefusedError as err:
                refusal = err
            if len(part) <= _JUDGED_ONE_BY_ONE and part[0] not in known:
                for i in part:
                    position = group.positions[i]
                    known[i] = decode_one(self._codec, self._admission, records[position], now_ms)
                    if isinstance(known[i], SchemaError):
                        dead.append((position, reason_of(known[i])))
                rest = np.array([i for i in part if not isinstance(known[i], SchemaError)], dtype=np.int64)
                if len(rest) < len(part):
                    if len(rest):
                        pending.append(rest)
                    continue
            if len(part) == 1:
                dead.append((group.positions[part[0]], reason_of(CorruptPayloadError(
                    f"ClickHouse cannot read this {plan.kind} body: {refusal}"))))
            else:
                pending += [part[len(part) // 2:], part[:len(part) // 2]]  # the first half next
        return parsed

    def _parse_bodies(self, plan: WriterPlan, bodies: list[bytes], indices: np.ndarray) -> _Parsed:
        chosen = bodies if len(indices) == len(bodies) else [bodies[i] for i in indices]
        data = container(plan.schema_json, chosen)
        table = self._parser.parse(data, plan.select)
        faithful = plan.faithful(table, data, np.fromiter(map(len, chosen), dtype=np.int64, count=len(chosen)))
        return _Parsed(indices, faithful, plan.to_reader(table if faithful.all() else table.filter(faithful)))


def _frame(kind: str, parts: list[_Rows]) -> Frame:
    """One kind's rows from every writer, in batch order."""
    writers = list(dict.fromkeys(part.writer for part in parts))
    positions = np.concatenate([part.positions for part in parts])
    table = pa.concat_tables([part.table for part in parts]) if len(parts) > 1 else parts[0].table
    bodies = [body for part in parts for body in part.bodies] if len(parts) > 1 else parts[0].bodies
    writer_ids = np.concatenate([np.full(len(part.positions), writers.index(part.writer), dtype=np.int32)
                                 for part in parts])
    if len(parts) > 1 and np.any(np.diff(positions) < 0):
        order = np.argsort(positions, kind="stable")
        positions, writer_ids, table = positions[order], writer_ids[order], table.take(order)
        bodies = [bodies[i] for i in order]
    return Frame(kind, table, positions, bodies, writer_ids, writers)
