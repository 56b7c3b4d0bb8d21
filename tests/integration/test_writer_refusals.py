"""The ClickHouse writer on the real embedded engine: a refused row never holds up its neighbours, a batch over
many days is stored, and an event is only ever skipped as a redelivery when that very event is stored."""

import time
import uuid

import pytest
from clickhouse_connect.driver.exceptions import DatabaseError, DataError, OperationalError

from trainwire.consumers.rows import to_row
from trainwire.consumers.writer import ClickHouseWriter, is_data_error
from trainwire.schemas import GpuSample, Step

DAY_MS = 86_400_000


def gpu_row(run: str, seq: int, rank: int = 0) -> list:
    sample = GpuSample.model_construct(event_id=uuid.uuid4().hex, run_id=run, experiment="e", team="", host="h",
                                       seq=seq, ts_ms=time.time_ns() // 1_000_000, rank=rank, gpu_index=0,
                                       gpu_uuid="GPU-0", gpu_name="", utilization_pct=1.0, memory_used_mb=None,
                                       memory_total_mb=None, temperature_c=None, power_w=None, sm_clock_mhz=None,
                                       mem_clock_mhz=None)
    return to_row("gpu_sample", sample.__dict__)


def step_row(run: str, seq: int, ts_ms: int | None = None, event_id: str | None = None) -> list:
    step = Step(run_id=run, experiment="e", host="h", seq=seq, step=seq, loss=1.0,
                **({"ts_ms": ts_ms} if ts_ms is not None else {}), **({"event_id": event_id} if event_id else {}))
    return to_row("step", step.__dict__)


def count(client, table: str, run: str) -> int:
    return client.query(f"SELECT count() FROM {table} FINAL WHERE run_id = {{r:String}}",
                        parameters={"r": run}).result_rows[0][0]


def test_a_row_clickhouse_refuses_is_handed_back_and_the_rest_is_stored(client):
    rows = [gpu_row("r", i, rank=70_000 if i == 6 else 0) for i in range(10)]
    sources = [f"record-{i}" for i in range(10)]
    result = ClickHouseWriter(client).write({"gpu_sample": rows}, {"gpu_sample": sources})
    assert [source for source, _ in result.refused] == ["record-6"]
    assert "rank" in result.refused[0][1]
    assert result.inserted == 9 and count(client, "gpu_samples", "r") == 9


def test_one_batch_across_150_days_is_stored(client):
    start = time.time_ns() // 1_000_000
    rows = [step_row("r", i, ts_ms=start + i * DAY_MS) for i in range(150)]
    result = ClickHouseWriter(client).write({"step": rows})
    assert result.inserted == 150 and not result.refused and count(client, "steps", "r") == 150


def test_a_resumed_runs_late_events_are_stored_and_true_redeliveries_skipped(client):
    """Process B (numbering from its later start) is stored first; A's spooled events arrive after. They sit
    below B's high-water mark, but were never stored: every one is stored. Sent again, every one is skipped."""
    a = [step_row("resumed", 1_000 + i) for i in range(30)]
    b = [step_row("resumed", 5_000 + i) for i in range(30)]
    writer = ClickHouseWriter(client)
    assert writer.write({"step": b}).inserted == 30
    assert writer.write({"step": a}).inserted == 30
    again = writer.write({"step": a + b + a[:5]})
    assert again.inserted == 0 and again.redeliveries_skipped == 65
    fresh_writer = ClickHouseWriter(client)  # marks learnt from the store, as after a restart
    assert fresh_writer.write({"step": a[:10] + b[-3:]}).redeliveries_skipped == 13
    assert count(client, "steps", "resumed") == 60
    rolled_up = client.query("SELECT sum(steps) FROM steps_1m WHERE run_id = 'resumed'").result_rows
    assert rolled_up[0][0] == 60  # the rollups count each event once


def test_the_same_event_twice_in_one_batch_is_stored_once(client):
    row = step_row("dup", 7)
    result = ClickHouseWriter(client).write({"step": [row, step_row("dup", 8), list(row)]})
    assert result.inserted == 2 and result.redeliveries_skipped == 1


@pytest.mark.parametrize("err, data", [
    (OperationalError("Error HTTPConnectionPool: connection refused"), False),
    (DataError("Unable to create native array for column `rank`"), True),
    (DatabaseError("Code: 53. DB::Exception: Type mismatch in IN or VALUES section. (TYPE_MISMATCH)"), True),
    (DatabaseError("Code: 252. DB::Exception: Too many partitions for single INSERT block (more than 100)"), True),
    (DatabaseError("Code: 252. DB::Exception: Too many parts (600). Merges are processing significantly slower"),
     False),
    (DatabaseError("Code: 241. DB::Exception: Memory limit (total) exceeded"), False),
    (DatabaseError("HTTPDriver for http://ch:8123 received ClickHouse error code 209: Timeout"), False),
    (ConnectionResetError("reset by peer"), False),
])
def test_data_errors_are_told_from_an_unavailable_store(err, data):
    assert is_data_error(err) is data

