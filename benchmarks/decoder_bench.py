"""The columnar decoder alone: µs per event for `FrameDecoder.decode` of one poll of a fleet's steps and GPU
samples (single-object codec, embedded chdb store), against the per-record path (`decode_one` per record).

The messages are made before the clock starts; each repeat decodes the same records. Wall and process CPU time
(every thread's, chdb's included) are kept; on a shared machine the CPU time and the best repeat are the steadier.
One more decode runs under cProfile, for where the time goes.

    .venv/bin/python benchmarks/decoder_bench.py --events 200000 --runs 1000 --repeat 5
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import source, write_result  # noqa: E402
from fleet_mix import FleetMix, generate, kinds_of  # noqa: E402

from trainwire.consumers.admission import Admission  # noqa: E402
from trainwire.consumers.avro_parser import AvroParser  # noqa: E402
from trainwire.consumers.frames import FrameDecoder, decode_one  # noqa: E402
from trainwire.infra.config import Settings  # noqa: E402
from trainwire.infra.log import Record  # noqa: E402
from trainwire.schemas import SingleObjectCodec  # noqa: E402


def records_of(events: int, runs: int, settings: Settings) -> tuple[list[Record], dict]:
    """A fleet's steps and GPU samples (no evals, heartbeats or faults), as the consumer polls them."""
    mix = FleetMix.for_events(events, runs=runs, eval_every_steps=10**9, heartbeat_every_s=10**9, nan_losses=0,
                              corrupt_messages=0)
    now = time.time_ns() // 1_000_000
    messages = generate(mix, now, workers=2)
    records = [Record(settings.topic(m.topic), 0, i, m.key, m.value, m.ts_ms) for i, m in enumerate(messages)]
    return records, kinds_of(messages)


def timed(decode) -> tuple[float, float]:
    started, cpu = time.perf_counter(), time.process_time()
    decode()
    return time.perf_counter() - started, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=1_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-record-path", action="store_true", help="skip the per-record reference timing")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as home:
        settings = Settings(home=Path(home))
        records, kinds = records_of(args.events, args.runs, settings)
        count = len(records)
        codec = SingleObjectCodec()
        avro = AvroParser(settings.store_dsn)
        decoder = FrameDecoder(codec, settings, avro)
        now_ms = time.time_ns() // 1_000_000
        decoded = decoder.decode(records, now_ms)  # warm: plans, engine, caches
        assert not decoded.dead_letters and sum(len(f.positions) for f in decoded.frames.values()) == count
        columnar = [timed(lambda: decoder.decode(records, now_ms)) for _ in range(args.repeat)]
        profile = cProfile.Profile()
        profile.runcall(decoder.decode, records, now_ms)
        admission = Admission(settings)
        per_record = [] if args.no_record_path else [
            timed(lambda: [decode_one(codec, admission, r, now_ms) for r in records]) for _ in range(2)]
        avro.close()

    def per_event(samples: list[tuple[float, float]], which: int) -> dict:
        values = [s[which] / count * 1e6 for s in samples]
        return {"best": round(min(values), 3), "median": round(statistics.median(values), 3)} if values else {}

    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("cumulative").print_stats(25)
    result = {
        "events": count, "runs": args.runs, "kinds": kinds, "source": source(),
        "columnar_us_per_event": {"wall": per_event(columnar, 0), "cpu": per_event(columnar, 1)},
        "per_record_us_per_event": {"wall": per_event(per_record, 0), "cpu": per_event(per_record, 1)},
    }
    print(out.getvalue())
    print(result)
    print(write_result("decoder", result))


if __name__ == "__main__":
    main()
