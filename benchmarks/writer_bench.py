"""The writer alone: µs per event to store a batch of step events into a fresh chdb store, through `write_frames`
(the columnar path: the events' Avro bodies in one container) and through `write` (rows, the per-record path).

Each repeat stores the same batch into two fresh stores, one per path, in alternating order; the batch is made
before the clock starts (encoding, decoding and row building are other steps' costs). Both wall time and the
process's CPU time (every thread's, chdb's included) are kept: on a shared machine the CPU time is the steadier.
The columnar write is also taken apart (wall time): de-duplication on columns, building the container, and
ClickHouse's insert.

    .venv/bin/python benchmarks/writer_bench.py --events 200000 --runs 1000 --repeat 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from fastavro.schema import to_parsing_canonical_form

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import source, write_result  # noqa: E402

from trainwire.consumers.frames import Frame, reader_schema  # noqa: E402
from trainwire.consumers.rows import to_row  # noqa: E402
from trainwire.consumers.stored import StoredEvents  # noqa: E402
from trainwire.consumers.writer import ClickHouseWriter, _stored_schema  # noqa: E402
from trainwire.infra.store import connect_store, migrate  # noqa: E402
from trainwire.schemas import Step, decode_record, encode  # noqa: E402
from trainwire.schemas.codec import HEADER_LEN, latest  # noqa: E402
from trainwire.schemas.ocf import container  # noqa: E402


def batch(events: int, runs: int) -> tuple[Frame, list[list]]:
    """`events` steps of `runs` runs, interleaved as a fleet's batch arrives, as a frame and as rows."""
    now = time.time_ns() // 1_000_000
    messages = [encode(Step(run_id=f"run-{i % runs:04d}", experiment="bench", host="h", seq=1_000 + i // runs,
                            step=i // runs, loss=2.0 / (1 + i // runs), learning_rate=1e-4, grad_norm=0.5,
                            tokens_per_s=9_000.0, ts_ms=now - events + i)) for i in range(events)]
    records = [decode_record(message)[1] for message in messages]
    frame = Frame("step", pa.Table.from_pylist(records, schema=reader_schema("step")),
                  np.arange(events, dtype=np.int64), [m[HEADER_LEN:] for m in messages],
                  np.zeros(events, dtype=np.int32), [to_parsing_canonical_form(latest("step").parsed)])
    return frame, [to_row("step", record) for record in records]


def timed(store: Path, write) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one write into a fresh store."""
    client = connect_store(f"chdb://{store}")
    try:
        migrate(client)
        writer = ClickHouseWriter(client)
        started, cpu = time.perf_counter(), time.process_time()
        result = write(writer)
        seconds = time.perf_counter() - started, time.process_time() - cpu
        assert not result.refused and result.redeliveries_skipped == 0
        return seconds
    finally:
        client.close()


def parts(store: Path, frame: Frame) -> dict[str, float]:
    """Seconds of each step of a columnar write, taken apart on a fresh store."""
    client = connect_store(f"chdb://{store}")
    try:
        migrate(client)
        started = time.perf_counter()
        fresh = StoredEvents(client).fresh_mask("step", frame.table)
        deduplicated = time.perf_counter()
        ocf = container(_stored_schema(frame.writers[0]), frame.bodies)
        contained = time.perf_counter()
        client.raw_insert("steps", None, insert_block=ocf, fmt="Avro",
                          settings={"input_format_avro_allow_missing_fields": 1})
        inserted = time.perf_counter()
        assert fresh.all()
        return {"fresh_mask": deduplicated - started, "container": contained - deduplicated,
                "raw_insert": inserted - contained}
    finally:
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=1_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--name", default="writer")
    args = parser.parse_args()

    frame, rows = batch(args.events, args.runs)
    seconds: dict[str, list[tuple[float, float]]] = {"write_frames": [], "write_rows": []}
    pieces: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="writer-bench-") as scratch:
        for i in range(args.repeat):
            order = ["write_frames", "write_rows"] if i % 2 == 0 else ["write_rows", "write_frames"]
            for path in order:
                store = Path(scratch) / f"{path}-{i}"
                if path == "write_frames":
                    seconds[path].append(timed(store, lambda w: w.write_frames({"step": frame})))
                else:
                    seconds[path].append(timed(store, lambda w: w.write({"step": rows})))
            for name, value in parts(Path(scratch) / f"parts-{i}", frame).items():
                pieces.setdefault(name, []).append(value)

    def per_event(values: list[float]) -> float:
        return round(statistics.median(values) / args.events * 1e6, 2)

    result = {
        "source": source(), "events": args.events, "runs": args.runs, "repeat": args.repeat,
        "wall_us_per_event": {path: per_event([wall for wall, _ in values]) for path, values in seconds.items()},
        "cpu_us_per_event": {path: per_event([cpu for _, cpu in values]) for path, values in seconds.items()},
        "write_frames_parts_us_per_event": {name: per_event(values) for name, values in pieces.items()},
        "seconds": {path: {"wall": [wall for wall, _ in values], "cpu": [cpu for _, cpu in values]}
                    for path, values in seconds.items()},
        "load_average": Path("/proc/loadavg").read_text().split()[:3],
    }
    print({key: result[key] for key in ("wall_us_per_event", "cpu_us_per_event", "write_frames_parts_us_per_event")})
    print(write_result(args.name, result))


if __name__ == "__main__":
    main()
