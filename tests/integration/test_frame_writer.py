"""The columnar writer (`write_frames`) on the real embedded engine: it stores what the per-record path stores,
every kind and every shipped schema version alike; each event once, however often it is delivered; and a row the
store refuses never holds up its neighbours."""

from __future__ import annotations

import io
import math
import time
import uuid
from collections import defaultdict
from importlib import resources

import fastavro
import pytest
from fastavro.schema import to_parsing_canonical_form
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.frame_builder import decoded_of, decoded_of_messages
from trainwire.consumers.frames import Frame
from trainwire.consumers.rows import TABLE_FOR_KIND, to_row
from trainwire.consumers.writer import ClickHouseWriter, StoreWriteError
from trainwire.infra.store import connect_store
from trainwire.schemas import Alert, Checkpoint, Eval, GpuSample, Heartbeat, RunEnded, RunStarted, Step
from trainwire.schemas.codec import MAGIC, decode_record, registry
from trainwire.schemas.events import LONG_MAX, FileDigest

DAY_MS = 86_400_000
SHA = "sha256:" + "ab" * 32
NOW = time.time_ns() // 1_000_000 - 60_000


def frames_of(events: list) -> dict[str, Frame]:
    return decoded_of(events).frames


def count(client, table: str, run: str) -> int:
    return client.query(f"SELECT count() FROM {table} FINAL WHERE run_id = {{r:String}}",
                        parameters={"r": run}).result_rows[0][0]


def step(run: str, seq: int, **fields) -> Step:
    return Step(**{"run_id": run, "experiment": "e", "host": "h", "seq": seq, "step": seq, "loss": 1.0, "ts_ms": NOW,
                   **fields})


def encoded_as(event, version: int) -> bytes:
    """`event` as a producer with schema version `version` of its kind sends it."""
    (schema,) = [s for s in registry().values() if s.kind == type(event).kind and s.version == version]
    out = io.BytesIO(MAGIC + schema.fingerprint)
    out.seek(0, io.SEEK_END)
    fastavro.schemaless_writer(out, schema.parsed, event.model_dump())
    return out.getvalue()


def every_kind() -> list[bytes]:
    """One batch holding each kind in each shipped schema version, with the values a store gets wrong first:
    NaN and infinities, empty and non-ASCII strings, maps, nested file lists, extreme integers."""
    odd = [math.nan, math.inf, -math.inf, -0.0, 5e-324, 1.7976931348623157e308]
    files = [FileDigest(name="model.safetensors", size=LONG_MAX, sha256=SHA), FileDigest(name="é\t\n", size=0,
                                                                                          sha256=SHA)]
    common = {"experiment": "exp ∑", "team": "t", "host": "h-1", "ts_ms": NOW}
    latest = [
        RunStarted(run_id="r1", seq=1, run_name="", tags={"a": "1", "ключ": "значение", "": ""},
                   hyperparameters_json='{"lr": 1e-4}', git_dirty=False, dataset_samples=LONG_MAX, seed=-(2**63),
                   data_seed=LONG_MAX, environment={"CUDA": "12"}, gpu_count=2**31 - 1, total_steps=0,
                   total_epochs=math.nan, dataset_preprocessing=["dedup", "tok"], numpy_seed=-1,
                   cudnn_deterministic=True, world_size=2**31 - 1, adapter_json="{}", **common),
        *[Step(run_id="r1", seq=10 + i, step=i, epoch=value, loss=value, learning_rate=None, tokens=LONG_MAX,
               extra={"nan": math.nan, "inf": math.inf, "x": value}, **common) for i, value in enumerate(odd)],
        Step(run_id="r1", seq=20, step=0, **common),
        Eval(run_id="r1", seq=30, step=3, eval_loss=math.inf, perplexity=math.nan, metrics={"acc": 0.5, "f": -0.0},
             **common),
        GpuSample(run_id="r1", seq=40, rank=65_535, gpu_index=65_535, gpu_uuid="GPU-ü", utilization_pct=math.nan,
                  power_w=math.inf, **common),
        Heartbeat(run_id="r1", seq=50, step=None, events_dropped=LONG_MAX, spool_bytes=0, **common),
        Checkpoint(run_id="r1", seq=60, step=7, path="/ckpt/7", files=files, eval_loss=math.nan, is_best=None,
                   deleted=True, **common),
        Checkpoint(run_id="r1", seq=61, step=8, path="/ckpt/8", **common),
        RunEnded(run_id="r1", seq=70, status="failed", error="boom\nline 2", duration_s=math.inf,
                 completed_steps=LONG_MAX, final_loss=math.nan, artifacts=files, events_invalid=3, **common),
        Alert(run_id="r1", experiment="exp", ts_ms=NOW, rule="loss_nan", severity="critical", state="firing",
              value=math.nan, threshold=-math.inf, message="NaN ∞", dedup_key="k"),
    ]
    old = [
        (RunStarted(run_id="r2", seq=1, tags={"x": "y"}, seed=7, dataset_preprocessing=["ignored by v1"], **common),
         1),
        (Heartbeat(run_id="r2", seq=2, step=5, events_dropped=9, **common), 1),
        (Checkpoint(run_id="r2", seq=3, step=1, path="/p", files=files, is_best=True, deleted=True, **common), 1),
        (RunEnded(run_id="r2", seq=4, status="completed", artifacts=files[:1], events_spooled=2, **common), 1),
    ]
    versions = {s.kind: max(v.version for v in registry().values() if v.kind == s.kind) for s in registry().values()}
    return ([encoded_as(event, versions[type(event).kind]) for event in latest]
            + [encoded_as(event, version) for event, version in old])


def stored_text(client) -> dict[str, str]:
    """Every event table, row for row as ClickHouse prints it (NaN included), in a fixed order."""
    return {table: client.raw_query(f"SELECT * FROM {table} ORDER BY event_id FORMAT TabSeparated").decode()
            for table in TABLE_FOR_KIND.values()}


def as_shipped(writer: str) -> str:
    """A writer schema in its parsing canonical form, as the file it came from holds it (docs, defaults)."""
    (version,) = [v for v in registry().values() if to_parsing_canonical_form(v.parsed) == writer]
    return (resources.files("trainwire.schemas") / "avro" / f"{version.kind}.v{version.version}.avsc").read_text()


@pytest.mark.parametrize("writer_form", ["canonical", "as shipped"])
def test_every_kind_and_schema_version_is_stored_as_the_row_path_stores_it(client, writer_form):
    messages = every_kind()
    frames = decoded_of_messages(messages).frames
    assert sum(len(frame.writers) for frame in frames.values()) == len(frames) + 4  # old versions beside new
    if writer_form == "as shipped":
        for frame in frames.values():
            frame.writers = [as_shipped(writer) for writer in frame.writers]

    written = ClickHouseWriter(client).write_frames(frames)
    assert not written.refused and written.inserted == len(messages) - 1  # the alert is not an event
    by_frames = stored_text(client)
    for table in TABLE_FOR_KIND.values():
        client.command(f"TRUNCATE TABLE {table}")
    rows = defaultdict(list)
    for message in messages:
        kind, record = decode_record(message)
        rows[kind].append(to_row(kind, record))
    assert not ClickHouseWriter(client).write(dict(rows)).refused

    by_rows = stored_text(client)
    assert all(by_rows[table] for table in TABLE_FOR_KIND.values())
    for table in TABLE_FOR_KIND.values():
        assert by_frames[table] == by_rows[table], table
    assert "nan" in by_rows["steps"] and "inf" in by_rows["steps"] and "model.safetensors" in by_rows["checkpoints"]


def test_a_batch_written_twice_stores_each_event_once(client):
    events = [step(f"run-{i % 3}", 100 + i) for i in range(30)]
    writer = ClickHouseWriter(client)
    assert writer.write_frames(frames_of(events)).inserted == 30
    again = writer.write_frames(frames_of(events))
    assert again.inserted == 0 and again.redeliveries_skipped == 30 and writer.redeliveries_skipped == 30
    assert sum(count(client, "steps", f"run-{i}") for i in range(3)) == 30
    assert writer.rows_written == 30


def test_the_same_event_twice_in_one_frame_is_stored_once_the_first_as_sent(client):
    first = step("dup", 7, loss=1.0)
    resent = first.model_copy(update={"loss": 2.0})  # the same event (its id), as a buggy resend might alter it
    result = ClickHouseWriter(client).write_frames(frames_of([first, step("dup", 8), resent]))
    assert result.inserted == 2 and result.redeliveries_skipped == 1
    assert client.query("SELECT loss FROM steps WHERE seq = 7").result_rows == [(1.0,)]


def test_a_resumed_runs_late_events_are_stored_and_true_redeliveries_skipped(client):
    """Process B (numbering from its later start) is stored first; A's spooled events arrive after. They sit
    below B's high-water mark, but were never stored: every one is stored. Sent again, every one is skipped."""
    a = [step("resumed", 1_000 + i) for i in range(30)]
    b = [step("resumed", 5_000 + i) for i in range(30)]
    writer = ClickHouseWriter(client)
    assert writer.write_frames(frames_of(b)).inserted == 30
    assert writer.write_frames(frames_of(a)).inserted == 30
    again = writer.write_frames(frames_of(a + b + a[:5]))
    assert again.inserted == 0 and again.redeliveries_skipped == 65
    assert count(client, "steps", "resumed") == 60
    rolled_up = client.query("SELECT sum(steps) FROM steps_1m WHERE run_id = 'resumed'").result_rows
    assert rolled_up[0][0] == 60  # the rollups count each event once


def test_forgotten_marks_are_learnt_again_from_the_store(client):
    stored = [step("r", 10 + i) for i in range(10)]
    samples = [GpuSample(run_id="r", experiment="e", host=f"h{i % 2}", seq=i, rank=i % 3, gpu_index=0,
                         gpu_uuid="GPU-0", ts_ms=NOW) for i in range(12)]
    writer = ClickHouseWriter(client)
    assert writer.write_frames(frames_of(stored + samples)).inserted == 22
    writer.forget_stored()  # as when partitions are revoked or an insert fails part-way
    late = step("r", 3)  # below the learnt mark, never stored
    result = writer.write_frames(frames_of(stored[5:] + [late] + samples + [step("r", 20)]))
    assert result.inserted == 2 and result.redeliveries_skipped == 17
    restarted = ClickHouseWriter(client)
    assert restarted.write_frames(frames_of(stored + samples + [late])).redeliveries_skipped == 23
    assert count(client, "steps", "r") == 12 and count(client, "gpu_samples", "r") == 12


def test_events_of_many_sequences_out_of_order_are_stored_once_each(client):
    """Sequences that fall back within a batch (a spool replayed behind newer events) take the per-event path;
    those around them stay on the columns; either way each event is stored once."""
    rising = [step("rising", 1 + i) for i in range(50)]
    events = {seq: step("shuffled", seq) for seq in (1, 2, 3, 5, 9, 12)}
    shuffled = [events[seq] for seq in (5, 3, 9, 3, 1, 12, 9, 2)]  # 3 and 9 delivered twice
    writer = ClickHouseWriter(client)
    result = writer.write_frames(frames_of(rising[:25] + shuffled + rising[25:]))
    assert result.inserted == 50 + 6 and result.redeliveries_skipped == 2
    assert sorted(r[0] for r in client.query("SELECT seq FROM steps WHERE run_id = 'shuffled'").result_rows) == [
        1, 2, 3, 5, 9, 12]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(earlier=st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 12)), max_size=12),
       batch=st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 12)), min_size=1, max_size=40),
       forget=st.booleans())
def test_any_deliveries_store_each_event_exactly_once(client, earlier, batch, forget):
    """Events are (run, seq) pairs, the same pair being the same event; whatever was stored before and however
    the batch repeats or reorders them, the store ends up with each event once and the counts say so."""
    client.command("TRUNCATE TABLE steps")
    ids = {}

    def event(run: str, seq: int) -> Step:
        ids.setdefault((run, seq), str(uuid.uuid4()))
        return step(run, seq, event_id=ids[(run, seq)])

    writer = ClickHouseWriter(client)
    if earlier:
        writer.write_frames(frames_of([event(*pair) for pair in earlier]))
    if forget:
        writer = ClickHouseWriter(client)
    result = writer.write_frames(frames_of([event(*pair) for pair in batch]))
    new = set(batch) - set(earlier)
    assert result.inserted == len(new) and result.redeliveries_skipped == len(batch) - len(new)
    rows = client.query("SELECT run_id, seq, count() FROM steps GROUP BY run_id, seq").result_rows
    assert {(run, seq): n for run, seq, n in rows} == {pair: 1 for pair in set(earlier) | set(batch)}


def test_a_row_holding_an_integer_its_column_cannot_is_refused_and_the_rest_stored(client):
    samples = [GpuSample.model_construct(event_id=uuid.uuid4().hex, run_id="r", experiment="e", team="", host="h",
                                         seq=i, ts_ms=NOW, rank=70_000 if i == 6 else 0, gpu_index=0,
                                         gpu_uuid="GPU-0", gpu_name="", utilization_pct=1.0, memory_used_mb=None,
                                         memory_total_mb=None, temperature_c=None, power_w=None, sm_clock_mhz=None,
                                         mem_clock_mhz=None) for i in range(10)]
    bad_file = FileDigest.model_construct(name="f", size=-1, sha256=SHA)
    checkpoints = [Checkpoint.model_construct(**Checkpoint(run_id="r", experiment="e", seq=i, step=i, path="/p",
                                                           ts_ms=NOW).__dict__ | {"files": [bad_file] if i else []})
                   for i in range(2)]
    result = ClickHouseWriter(client).write_frames(frames_of(samples + checkpoints))
    assert sorted(position for position, _ in result.refused) == [6, 11]
    reasons = dict(result.refused)
    assert "rank" in reasons[6] and "70000" in reasons[6] and "files.size" in reasons[11]
    assert result.inserted == 10 and count(client, "gpu_samples", "r") == 9 and count(client, "checkpoints", "r") == 1
    assert client.query("SELECT max(rank) FROM gpu_samples").result_rows == [(0,)]  # nothing stored wrapped around


def test_a_body_clickhouse_refuses_is_handed_back_with_its_reason_and_the_rest_stored(client):
    events = [step("r", i) for i in range(10)]
    frame = frames_of(events)["step"]
    frame.bodies[6] = frame.bodies[6][:-3]  # cut short: ClickHouse cannot read the row
    result = ClickHouseWriter(client).write_frames({"step": frame})
    assert [position for position, _ in result.refused] == [6]
    assert "ClickHouse refused the row" in result.refused[0][1]
    assert result.inserted == 9 and count(client, "steps", "r") == 9
    assert ClickHouseWriter(client).write_frames({"step": frame}).refused[0][0] == 6  # never taken as stored


def test_one_frame_across_150_days_is_stored(client):
    events = [step("r", i).model_copy(update={"ts_ms": NOW + i * DAY_MS}) for i in range(150)]
    result = ClickHouseWriter(client).write_frames(frames_of(events))
    assert result.inserted == 150 and not result.refused and count(client, "steps", "r") == 150



def test_an_unavailable_store_fails_the_whole_write_and_the_marks_are_learnt_again(client, tmp_path):
    """A server error that says nothing about the rows (here: out of memory) raises StoreWriteError, refusing
    nothing; what this writer knew of the store is forgotten, so events another writer stored meanwhile (or that
    a part-way insert stored) are skipped on the retry, not stored twice."""
    writer = ClickHouseWriter(client)
    events = [step("r", seq) for seq in range(1, 21)]
    assert writer.write_frames(frames_of(events[:10])).inserted == 10
    client.set_client_setting("max_memory_usage", "1")
    with pytest.raises(StoreWriteError, match="MEMORY_LIMIT_EXCEEDED"):
        writer.write_frames(frames_of(events[10:12]))
    other = connect_store(f"chdb://{tmp_path / 'chdb'}")  # another client of the same store
    try:
        assert ClickHouseWriter(other).write_frames(frames_of(events[10:15])).inserted == 5
    finally:
        other.close()
    client.set_client_setting("max_memory_usage", "0")
    retried = writer.write_frames(frames_of(events[10:]))
    assert retried.inserted == 5 and retried.redeliveries_skipped == 5
    assert client.query("SELECT sum(steps) FROM steps_1m WHERE run_id = 'r'").result_rows == [(20,)]
