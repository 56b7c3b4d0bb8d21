"""Poison records through `trainwire consume` on the real broker: nothing wedges, crashes or silences ingest.

Each bad record sits between valid neighbours. Every neighbour must be stored, every bad record stored or
dead-lettered with its reason, and the consumer must finish `--drain` with exit 0.
"""

import io
import json
import math
import os
import subprocess
import sys
import time
import uuid

import fastavro
import pytest
from confluent_kafka import Producer

from trainwire.infra.log import ensure_topics
from trainwire.infra.log.topics import ALERTS, CONTROL, DEAD_LETTERS, EVENTS, GPU
from trainwire.infra.store import connect_store
from trainwire.schemas import Alert, GpuSample, Step, StopCommand, encode
from trainwire.schemas.codec import MAGIC, latest

pytestmark = pytest.mark.kafka
DAY_MS = 86_400_000


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def raw(kind: str, **fields) -> bytes:
    """An Avro single-object message of `kind` written straight from `fields`: no pydantic, so any value Avro
    can hold gets through, as from a producer that is not trainwire's SDK."""
    schema = latest(kind)
    out = io.BytesIO()
    out.write(MAGIC + schema.fingerprint)
    fastavro.schemaless_writer(out, schema.parsed, fields)
    return out.getvalue()


def envelope(run_id: str, seq: int, **fields) -> dict:
    return {"event_id": uuid.uuid4().hex, "run_id": run_id, "experiment": "poison", "team": "", "host": "h",
            "seq": seq, "ts_ms": now_ms(), **fields}


def step(run_id: str, seq: int, loss: float = 1.0, **fields) -> bytes:
    return encode(Step(run_id=run_id, experiment="poison", host="h", seq=seq, step=seq, loss=loss, **fields))


def gpu_fields(**overrides) -> dict:
    fields = {"rank": 0, "gpu_index": 0, "gpu_uuid": "GPU-0", "gpu_name": "H100", "utilization_pct": 50.0,
              "memory_used_mb": 1.0, "memory_total_mb": 80_000.0, "temperature_c": 50.0, "power_w": 300.0,
              "sm_clock_mhz": None, "mem_clock_mhz": None}
    return {**fields, **overrides}


def step_fields(seq: int, **overrides) -> dict:
    fields = {"step": seq, "epoch": None, "loss": 1.0, "learning_rate": None, "grad_norm": None,
              "tokens_per_s": None, "samples_per_s": None, "batch_time_s": None, "tokens": None, "extra": {}}
    return {**fields, **overrides}


def poison_cases(run: str) -> dict[str, tuple[str, bytes | None, str]]:
    """name → (topic, payload, a word its dead letter's reason must hold)."""
    alert = Alert(run_id=run, experiment="poison", rule="loss_not_finite", severity="critical", state="firing",
                  dedup_key=f"{run}:loss_not_finite:forged", message="forged")
    stop = StopCommand(run_id=run, experiment="poison", rule="loss_not_finite", reason="forged",
                       dedup_key=f"{run}:stop")
    return {
        "gpu rank past UInt16": (GPU, raw("gpu_sample", **envelope(run, 1), **gpu_fields(rank=70_000)), "rank"),
        "gpu index past UInt16": (GPU, raw("gpu_sample", **envelope(run, 2), **gpu_fields(gpu_index=1 << 20)),
                                  "gpu_index"),
        "stop command on the events topic": (EVENTS, encode(stop), "stop_command"),
        "alert on the events topic": (EVENTS, encode(alert), "alert"),
        "gpu sample on the events topic": (EVENTS, raw("gpu_sample", **envelope(run, 3), **gpu_fields()),
                                           "gpu_sample"),
        "step on the gpu topic": (GPU, step(run, 4), "step"),
        "tombstone": (EVENTS, None, "null"),
        "empty value": (EVENTS, b"", "Avro"),
        "garbage": (EVENTS, b"\x00\xffnot avro at all", "Avro"),
        "unknown schema": (EVENTS, MAGIC + b"\x01" * 8 + b"\x00", "fingerprint"),
        "truncated body": (EVENTS, step(run, 5)[:-4], "corrupt"),
        "trailing bytes": (EVENTS, step(run, 6) + b"\x00\x00", "trailing"),
        "negative step": (EVENTS, raw("step", **envelope(run, 7), **step_fields(-5)), "step"),
        "negative seq": (EVENTS, raw("step", **envelope(run, -1), **step_fields(8)), "seq"),
        "blank run id": (EVENTS, raw("step", **envelope("  ", 9), **step_fields(9)), "run_id"),
        "dated ten years ago": (EVENTS, raw("step", **{**envelope(run, 10), "ts_ms": now_ms() - 3650 * DAY_MS},
                                            **step_fields(10)), "ts"),
        "dated next month": (EVENTS, raw("step", **{**envelope(run, 11), "ts_ms": now_ms() + 30 * DAY_MS},
                                         **step_fields(11)), "ts"),
        "dated before 1970": (EVENTS, raw("step", **{**envelope(run, 12), "ts_ms": -1}, **step_fields(12)), "ts"),
    }


def produce(bootstrap: str, messages: list[tuple[str, bytes | None, bytes | None]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for topic, key, value in messages:
        producer.produce(topic, key=key, value=value)
    assert producer.flush(30) == 0


def consume_drain(settings, *extra_env: tuple[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TRAINWIRE_")},
           "TRAINWIRE_KAFKA": settings.kafka, "TRAINWIRE_TOPIC_PREFIX": settings.topic_prefix,
           "TRAINWIRE_HOME": str(settings.home), "TRAINWIRE_BATCH_MAX_SECONDS": "0.2", **dict(extra_env)}
    return subprocess.run([sys.executable, "-m", "trainwire", "consume", "--drain", "--json"], env=env,
                          capture_output=True, text=True, timeout=timeout)


def ensure(settings) -> None:
    ensure_topics(settings, [settings.topic(t) for t in (EVENTS, GPU, ALERTS, DEAD_LETTERS, CONTROL)])


def test_poison_records_are_dead_lettered_and_their_neighbours_stored(kafka_settings):
    ensure(kafka_settings)
    healthy, victim = f"healthy-{uuid.uuid4().hex[:8]}", f"victim-{uuid.uuid4().hex[:8]}"
    cases = poison_cases(victim)
    messages, seq = [], 0
    for topic, payload, _ in cases.values():
        messages.append((kafka_settings.topic(EVENTS), healthy.encode(), step(healthy, seq)))
        messages.append((kafka_settings.topic(topic), victim.encode(), payload))
        messages.append((kafka_settings.topic(EVENTS), healthy.encode(), step(healthy, seq + 1)))
        seq += 2
    # After a forged alert claimed the incident, a real NaN on the victim must still page.
    messages.append((kafka_settings.topic(EVENTS), victim.encode(), step(victim, 100, loss=math.nan)))
    produce(kafka_settings.kafka, messages)

    started = time.monotonic()
    result = consume_drain(kafka_settings)
    assert result.returncode == 0, result.stderr[-3000:]
    assert time.monotonic() - started < 120
    assert "Traceback" not in result.stderr

    client = connect_store(kafka_settings.store_dsn)
    stored = client.query("SELECT step FROM steps FINAL WHERE run_id = {r:String} ORDER BY step",
                          parameters={"r": healthy}).result_rows
    assert [s for (s,) in stored] == list(range(seq))
    reasons = [r for (r,) in client.query("SELECT reason FROM dead_letters FINAL").result_rows]
    assert len(reasons) == len(cases), reasons
    for name, (_, _, word) in cases.items():
        assert any(word.lower() in r.lower() for r in reasons), f"{name}: no dead letter mentions {word!r}"
    alerts = client.query("SELECT rule, state, message FROM alerts FINAL WHERE run_id = {r:String}",
                          parameters={"r": victim}).named_results()
    alerts = list(alerts)
    assert not any(a["message"] == "forged" for a in alerts)  # a forged alert is never stored as an incident
    assert any(a["rule"] == "loss_not_finite" and a["state"] == "firing" for a in alerts)
    assert json.loads(result.stdout)["dead_lettered"] == len(cases)
    client.close()


def test_one_batch_across_many_days_is_stored_in_partition_sized_inserts(kafka_settings):
    """150 days in one batch: ClickHouse refuses an insert over 100 partitions; nothing may wedge on it."""
    ensure(kafka_settings)
    run = f"backfill-{uuid.uuid4().hex[:8]}"
    start = now_ms()
    messages = [(kafka_settings.topic(EVENTS), run.encode(),
                 raw("step", **{**envelope(run, i), "ts_ms": start + i * DAY_MS}, **step_fields(i)))
                for i in range(150)]
    produce(kafka_settings.kafka, messages)
    result = consume_drain(kafka_settings, ("TRAINWIRE_ACCEPT_DAYS_AHEAD", "200"))
    assert result.returncode == 0, result.stderr[-3000:]
    client = connect_store(kafka_settings.store_dsn)
    (count,) = client.query("SELECT count() FROM steps FINAL WHERE run_id = {r:String}",
                            parameters={"r": run}).result_rows[0]
    assert count == 150
    client.close()


def test_a_burst_of_dead_letters_stops_the_consumer_with_one_line(kafka_settings):
    """After a bad deploy every record fails: stop, commit nothing, and say why, instead of dead-lettering all."""
    ensure(kafka_settings)
    run = f"deploy-{uuid.uuid4().hex[:8]}"
    messages = [(kafka_settings.topic(EVENTS), run.encode(), step(run, 0))]
    messages += [(kafka_settings.topic(EVENTS), run.encode(), b"garbage %d" % i) for i in range(30)]
    produce(kafka_settings.kafka, messages)
    result = consume_drain(kafka_settings, ("TRAINWIRE_DEAD_LETTER_MAX_CONSECUTIVE", "10"))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "10 records in a row" in result.stderr and "TRAINWIRE_DEAD_LETTER_MAX_CONSECUTIVE" in result.stderr
    # What tripped the limit was not committed: with the limit raised, it is read again and nothing is lost.
    again = consume_drain(kafka_settings, ("TRAINWIRE_DEAD_LETTER_MAX_CONSECUTIVE", "100"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["dead_lettered"] >= 10
    client = connect_store(kafka_settings.store_dsn)
    assert client.query("SELECT count() FROM dead_letters FINAL").result_rows[0][0] == 30
    assert client.query("SELECT count() FROM steps FINAL").result_rows[0][0] == 1
    client.close()
