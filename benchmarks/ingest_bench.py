"""Ingest benchmark: events/s from the real broker into the embedded ClickHouse with one consumer process.

    .venv/bin/python benchmarks/ingest_bench.py [--events N] [--runs R] [--repeat K] [--kafka 127.0.0.1:9092]

Needs the real broker (infra/kafka/up). Writes benchmarks/results/ingest.json. Measures, on the same messages:
  1. bare Kafka consume (confluent-kafka, no decoding): the transport's ceiling on this machine;
  2. columnar insert of the same rows into chdb (clickhouse-connect), no Kafka, no decoding;
  3. the ingest pipeline end to end (`trainwire consume --drain`: poll → decode → validate → detect → insert →
     commit) in a process of its own, K times on fresh topics, with its peak memory;
  4. the Python cost per event of each hot-path step (decode, check, row, detectors), the budget that decides 3.
Lag while 1,000 simulated jobs stream is lag_bench.py's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result  # noqa: E402
from confluent_kafka import Consumer, Producer  # noqa: E402

from trainwire.consumers.detectors import DetectorEngine  # noqa: E402
from trainwire.consumers.rows import columns_of, to_row  # noqa: E402
from trainwire.consumers.service import tune_gc_for_ingest  # noqa: E402
from trainwire.infra.detector_settings import DetectorSettings  # noqa: E402
from trainwire.infra.config import Settings  # noqa: E402
from trainwire.infra.log import ensure_topics  # noqa: E402
from trainwire.infra.log.kafka_client import client_properties, producer_config  # noqa: E402
from trainwire.infra.store import connect_store, migrate  # noqa: E402
from trainwire.schemas import Step, decode_record, encode  # noqa: E402
from trainwire.schemas.checks import check_record  # noqa: E402


def step_messages(events: int, runs: int) -> list[tuple[bytes, bytes]]:
    run_ids = [str(uuid.uuid4()) for _ in range(runs)]
    rng = random.Random(0)
    out = []
    for i in range(events):
        run = i % runs
        step = i // runs
        event = Step(run_id=run_ids[run], experiment="bench", seq=step, step=step, loss=2.0 * math.exp(-step / 500),
                     learning_rate=2e-4, grad_norm=rng.uniform(0.5, 2.0), tokens_per_s=rng.gauss(3000, 50))
        out.append((run_ids[run].encode(), encode(event)))
    return out


def produce_all(settings: Settings, topic: str, messages: list[tuple[bytes, bytes]]) -> float:
    producer = Producer(producer_config(settings))
    started = time.perf_counter()
    for key, value in messages:
        while True:
            try:
                producer.produce(topic, value=value, key=key)
                break
            except BufferError:
                producer.poll(0.01)
        producer.poll(0)
    assert producer.flush(300) == 0
    return len(messages) / (time.perf_counter() - started)


def bare_consume(settings: Settings, topic: str, expected: int) -> float:
    consumer = Consumer(client_properties(settings) | {"group.id": f"bare-{uuid.uuid4().hex[:6]}",
                                                       "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    seen, started = 0, None
    while seen < expected:
        batch = consumer.consume(10_000, 1.0)
        if batch and started is None:
            started = time.perf_counter()
        seen += sum(1 for m in batch if m.error() is None)
    rate = expected / (time.perf_counter() - started)
    consumer.close()
    return rate


def columnar_insert(messages: list[tuple[bytes, bytes]], batch: int = 50_000) -> float:
    rows = [to_row("step", decode_record(value)[1]) for _, value in messages]
    columns = list(zip(*rows))
    with tempfile.TemporaryDirectory() as home:
        client = connect_store(f"chdb://{home}/chdb")
        migrate(client)
        started = time.perf_counter()
        for start in range(0, len(rows), batch):
            client.insert("steps", [list(c[start:start + batch]) for c in columns], column_names=columns_of("step"),
                          column_oriented=True)
        rate = len(rows) / (time.perf_counter() - started)
        client.close()
    return rate


def pipeline_drain(settings: Settings) -> dict:
    """`trainwire consume --drain` in a process of its own, its memory sampled from /proc while it runs.

    Not getrusage(RUSAGE_CHILDREN): Linux counts a child's pages from before its exec, i.e. this process's own
    memory (the messages, chdb) at the fork, which made an earlier run report 860 MB for a ~590 MB consumer."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TRAINWIRE_")},
           "TRAINWIRE_HOME": str(settings.home), "TRAINWIRE_KAFKA": settings.kafka,
           "TRAINWIRE_TOPIC_PREFIX": settings.topic_prefix, "TRAINWIRE_BATCH_MAX_ROWS": str(settings.batch_max_rows),
           "TRAINWIRE_BATCH_MAX_SECONDS": str(settings.batch_max_seconds)}
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "trainwire", "consume", "--drain", "--idle-seconds", "2", "--json"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0}
    while child.poll() is None:
        for key, kb in _memory(child.pid).items():
            peak[key] = max(peak[key], kb)
        time.sleep(0.1)
    elapsed = time.perf_counter() - started - 2  # the idle wait that ends --drain
    if child.returncode != 0:
        raise SystemExit(f"trainwire consume failed with exit code {child.returncode}")
    stats = json.loads(child.stdout.read())
    return {"events": stats["stored"], "seconds_incl_startup": round(elapsed, 2),
            "events_per_s": round(stats["stored"] / elapsed), "batches": stats["batches"],
            "peak_rss_mb": round(peak["VmHWM"] / 1024),
            # file-backed: mostly chdb's library code, shared and reclaimable; anonymous: the process's own data
            "peak_rss_anon_mb": round(peak["RssAnon"] / 1024), "peak_rss_file_mb": round(peak["RssFile"] / 1024)}


def _memory(pid: int) -> dict[str, int]:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # it has just exited
        return {}
    return {line.split(":")[0]: int(line.split()[1]) for line in status.splitlines()
            if line.split(":")[0] in ("VmHWM", "RssAnon", "RssFile")}


def stage_costs(messages: list[tuple[bytes, bytes]], repeats: int = 3) -> dict:
    """Python time per event of each step of the ingest hot path, in µs (median of `repeats`), single-threaded,
    with the garbage collector set as `trainwire consume` sets it."""
    tune_gc_for_ingest()
    values = [value for _, value in messages[:100_000]]
    samples: dict[str, list[float]] = {"decode": [], "check": [], "to_row": [], "detect": []}
    for _ in range(repeats):
        started = time.perf_counter()
        events = [decode_record(value) for value in values]
        decoded = time.perf_counter()
        for kind, fields in events:
            check_record(kind, fields)
        checked = time.perf_counter()
        for kind, fields in events:
            to_row(kind, fields)
        rowed = time.perf_counter()
        engine = DetectorEngine(DetectorSettings())
        detect_started = time.perf_counter()
        for kind, fields in events:
            engine.observe(kind, fields, ("events", 0))
        detected = time.perf_counter()
        for name, seconds in (("decode", decoded - started), ("check", checked - decoded),
                              ("to_row", rowed - checked), ("detect", detected - detect_started)):
            samples[name].append(seconds / len(values) * 1e6)
    costs = {name: round(statistics.median(values), 2) for name, values in samples.items()}
    return {"us_per_event": costs, "sum_us": round(sum(costs.values()), 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kafka", default="127.0.0.1:9092")
    parser.add_argument("--events", type=int, default=500_000)
    parser.add_argument("--runs", type=int, default=1_000)
    parser.add_argument("--repeat", type=int, default=3, help="end-to-end drains (fresh topics each); the median is quoted")
    args = parser.parse_args()

    print(f"encoding {args.events} step events of {args.runs} runs …", file=sys.stderr)
    messages = step_messages(args.events, args.runs)
    drains, produced, bare = [], [], []
    for attempt in range(args.repeat):
        with tempfile.TemporaryDirectory() as home:
            settings = Settings(home=Path(home), kafka=args.kafka,
                                topic_prefix=f"ingest-bench-{uuid.uuid4().hex[:6]}.", batch_max_rows=20_000,
                                batch_max_seconds=1.0)
            topic = settings.topic("events")
            ensure_topics(settings, [topic, settings.topic("gpu")])
            print(f"[{attempt + 1}/{args.repeat}] producing …", file=sys.stderr)
            produced.append(produce_all(settings, topic, messages))
            print(f"[{attempt + 1}/{args.repeat}] bare consume …", file=sys.stderr)
            bare.append(bare_consume(settings, topic, len(messages)))
            print(f"[{attempt + 1}/{args.repeat}] ingest pipeline …", file=sys.stderr)
            drain = pipeline_drain(settings)
            # what the same command takes with nothing to consume (imports, chdb, migrations, joining the group)
            empty = pipeline_drain(settings.model_copy(update={"topic_prefix": f"{settings.topic_prefix}empty."}))
            drain["startup_seconds"] = empty["seconds_incl_startup"]
            drain["sustained_events_per_s"] = round(drain["events"] / (drain["seconds_incl_startup"]
                                                                       - drain["startup_seconds"]))
            drains.append(drain)
            print(f"[{attempt + 1}/{args.repeat}] {drain['events_per_s']} events/s with start-up, "
                  f"{drain['sustained_events_per_s']} sustained", file=sys.stderr)
    print("columnar insert …", file=sys.stderr)
    insert = columnar_insert(messages)
    print("per-event Python cost of each hot-path step …", file=sys.stderr)
    stages = stage_costs(messages)  # last: it sets this process's GC as `trainwire consume` does
    ingest = {"median_events_per_s": statistics.median(d["events_per_s"] for d in drains),
              "median_sustained_events_per_s": statistics.median(d["sustained_events_per_s"] for d in drains),
              "max_peak_rss_mb": max(d["peak_rss_mb"] for d in drains), "drains": drains}
    result = {
        "kafka": args.kafka, "events": args.events, "runs": args.runs,
        "raw": {"produce_events_per_s": round(statistics.median(produced)),
                "bare_consume_events_per_s": round(statistics.median(bare)),
                "chdb_columnar_insert_rows_per_s": round(insert)},
        "ingest_pipeline": ingest,
        "hot_path": stages,
    }
    path = write_result("ingest", result)
    print(path.read_text())


if __name__ == "__main__":
    main()
