"""Ingest benchmark: events/s from the real broker into the embedded ClickHouse with one consumer process.

    .venv/bin/python benchmarks/ingest_bench.py [--events N] [--runs R] [--kafka 127.0.0.1:9092]

Needs the real broker (infra/kafka/up). Writes benchmarks/results/ingest.json. Measures, on the same messages:
  1. bare Kafka consume (confluent-kafka, no decoding): the transport's ceiling on this machine;
  2. columnar insert of the same rows into chdb (clickhouse-connect), no Kafka, no decoding;
  3. the ingest pipeline end to end (poll → decode → validate → detect → insert → commit), and its peak RSS;
  4. lag while many simulated jobs stream live through the SDK into the broker and this consumer drains them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result  # noqa: E402
from confluent_kafka import Consumer, Producer  # noqa: E402

from trainwire.consumers.rows import columns_of, to_row  # noqa: E402
from trainwire.infra.config import Settings  # noqa: E402
from trainwire.infra.log import ensure_topics  # noqa: E402
from trainwire.infra.log.kafka import producer_config  # noqa: E402
from trainwire.infra.store import connect_store, migrate  # noqa: E402
from trainwire.schemas import Step, decode_record, encode  # noqa: E402


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


def produce_all(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]]) -> float:
    producer = Producer(producer_config(bootstrap))
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


def bare_consume(bootstrap: str, topic: str, expected: int) -> float:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bare-{uuid.uuid4().hex[:6]}",
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
    """`trainwire consume --drain` in a process of its own, so its peak RSS is the consumer's alone."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TRAINWIRE_")},
           "TRAINWIRE_HOME": str(settings.home), "TRAINWIRE_KAFKA": settings.kafka,
           "TRAINWIRE_TOPIC_PREFIX": settings.topic_prefix, "TRAINWIRE_BATCH_MAX_ROWS": str(settings.batch_max_rows),
           "TRAINWIRE_BATCH_MAX_SECONDS": str(settings.batch_max_seconds)}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "trainwire", "consume", "--drain", "--idle-seconds", "2", "--json"],
                            env=env, capture_output=True, text=True, check=True)
    elapsed = time.perf_counter() - started - 2  # the idle wait that ends --drain
    stats = json.loads(result.stdout)
    return {"events": stats["stored"], "seconds_incl_startup": round(elapsed, 2),
            "events_per_s": round(stats["stored"] / elapsed), "batches": stats["batches"],
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kafka", default="127.0.0.1:9092")
    parser.add_argument("--events", type=int, default=500_000)
    parser.add_argument("--runs", type=int, default=1_000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as home:
        settings = Settings(home=Path(home), kafka=args.kafka, topic_prefix=f"ingest-bench-{uuid.uuid4().hex[:6]}.",
                            batch_max_rows=20_000, batch_max_seconds=1.0)
        topic = settings.topic("events")
        ensure_topics(settings, [topic, settings.topic("gpu")])
        print(f"encoding {args.events} step events of {args.runs} runs …", file=sys.stderr)
        messages = step_messages(args.events, args.runs)
        print("producing …", file=sys.stderr)
        produced_per_s = produce_all(args.kafka, topic, messages)
        print("bare consume …", file=sys.stderr)
        bare = bare_consume(args.kafka, topic, len(messages))
        print("columnar insert …", file=sys.stderr)
        insert = columnar_insert(messages)
        del messages
        print("ingest pipeline …", file=sys.stderr)
        ingest = pipeline_drain(settings)
    result = {
        "kafka": args.kafka, "events": args.events, "runs": args.runs,
        "raw": {"produce_events_per_s": round(produced_per_s), "bare_consume_events_per_s": round(bare),
                "chdb_columnar_insert_rows_per_s": round(insert)},
        "ingest_pipeline": ingest,
    }
    path = write_result("ingest", result)
    print(path.read_text())


if __name__ == "__main__":
    main()
