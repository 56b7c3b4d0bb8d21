"""Producers → transport → ingest → embedded ClickHouse, on the local log and on the real broker."""

import io
import math
import threading

import fastavro
import pytest
from fastavro.schema import fingerprint, to_parsing_canonical_form

from trainwire.consumers.service import build_ingest
from trainwire.consumers.writer import StoreWriteError
from trainwire.infra.log import open_producer
from trainwire.infra.log.topics import EVENTS
from trainwire.infra.store import connect_store
from trainwire.infra.store.read import StoreReader
from trainwire.producers import init
from trainwire.producers.simulate import JobPlan, SimulatedGpus, run_job
from trainwire.schemas import Step, encode
from trainwire.schemas.codec import MAGIC


def run_jobs(settings, faults):
    runs = [init("it", f"job-{i}", {"lr": 1e-4, "job": i}, settings=settings, gpu_source=SimulatedGpus(seed=i),
                 total_steps=120) for i in range(len(faults))]
    threads = [threading.Thread(target=lambda r=r, f=f: (run_job(r, JobPlan(steps=120, fault=f, seed=1)), r.finish()))
               for r, f in zip(runs, faults)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return runs


def drain(settings, group="ingest"):
    pipeline = build_ingest(settings, on_alert=lambda alert: None, group=group)
    pipeline.drain(idle_seconds=2.0, deadline=None)
    pipeline.close()
    return pipeline


def test_every_event_stored_once_and_nan_alerts_only_its_run(any_settings):
    runs = run_jobs(any_settings, [None, "nan", None, None])
    pipeline = drain(any_settings)
    reader = StoreReader(connect_store(any_settings.store_dsn))
    ids = [r.run_id for r in runs]

    assert reader.events_stored(ids) == sum(r.events_emitted for r in runs) == pipeline.stats.stored
    for run in runs:
        counts = reader.event_counts([run.run_id])
        assert counts["steps"] == 120 and counts["evals"] == 2 and counts["checkpoints"] == 1
        assert counts["run_started"] == counts["run_ended"] == 1 and counts["gpu_samples"] >= 2
    not_finite = [a for a in reader.incidents(ids) if a["rule"] == "loss_not_finite"]
    assert [a["run_id"] for a in not_finite] == [runs[1].run_id]
    nan_steps = [s for s in reader.steps(runs[1].run_id) if s["loss"] is not None and math.isnan(s["loss"])]
    assert nan_steps and nan_steps[0]["step"] == not_finite[0]["step"] == 72  # NaN stored, not dropped


def test_redelivered_events_still_count_once(local_settings):
    runs = run_jobs(local_settings, [None, "nan"])
    drain(local_settings)
    again = drain(local_settings, group="lost-its-offsets")  # re-reads everything
    client = connect_store(local_settings.store_dsn)
    reader = StoreReader(client)
    emitted = sum(r.events_emitted for r in runs)
    assert again.stats.consumed == emitted and again.stats.redeliveries_skipped == emitted
    assert again.stats.stored == 0  # nothing inserted twice: rollups count every step once
    assert reader.events_stored([r.run_id for r in runs]) == emitted
    raw_steps = client.query("SELECT count() FROM steps").result_rows[0][0]  # without FINAL: no duplicate rows
    assert raw_steps == client.query("SELECT sum(steps) FROM steps_1m").result_rows[0][0] == 240
    assert len([a for a in reader.incidents() if a["rule"] == "loss_not_finite"]) == 1


def test_a_run_resumed_under_its_id_by_a_new_process_keeps_every_event(local_settings):
    """An elastic restart or a resume with a fixed run id: a second process logs under the same run id. Its events
    must not read as redeliveries of the first process's (ingest keeps the highest stored seq per run)."""
    def attempt(steps, status):
        run = init("it", "resumed", {"lr": 1e-4}, settings=local_settings, run_id="r-resumed", sample_gpus=False)
        for step in steps:
            run.log_step(step, loss=1.0 / step)
        run.finish(status)
        return run

    def summary():
        client = connect_store(local_settings.store_dsn)
        try:
            reader = StoreReader(client)
            listed = next(run for run in reader.runs() if run["run_id"] == "r-resumed")
            summary = reader.run_summary("r-resumed")
            assert (listed["status"], listed["ended_at"]) == (summary["status"], summary["ended_at"])
            return summary, reader.events_stored(["r-resumed"])
        finally:
            client.close()

    first = attempt(range(1, 31), "failed")
    drain(local_settings)  # stored before the second process starts, as when a crashed job is restarted
    failed, _ = summary()
    assert failed["status"] == "failed" and failed["last_step"] == 30
    second = attempt(range(21, 61), "completed")  # resumed from the step-20 checkpoint
    pipeline = drain(local_settings)
    completed, stored = summary()
    assert pipeline.stats.redeliveries_skipped == 0
    assert stored == first.events_emitted + second.events_emitted
    assert completed["steps_logged"] == 30 + 40 and completed["last_step"] == 60
    assert completed["status"] == "completed" and completed["ended_at"] > failed["ended_at"]
    assert completed["started_at"] == failed["started_at"], "the run started when its first process did"


def test_poison_messages_go_to_dead_letters_and_the_rest_is_stored(any_settings):
    producer = open_producer(any_settings)
    topic = any_settings.topic(EVENTS)
    good = [Step(run_id="r-poison", experiment="it", seq=i, step=i, loss=1.0) for i in range(3)]
    producer.append(topic, b"r-poison", encode(good[0]))
    producer.append(topic, b"r-poison", b"\x00\x01 random bytes")
    producer.append(topic, b"r-poison", encode(good[1]))
    producer.append(topic, b"r-poison", encode(Step.model_construct(**{**good[2].model_dump(), "step": -5})))
    producer.append(topic, b"r-poison", unknown_schema_message())
    producer.append(topic, b"r-poison", encode(good[2]))
    assert producer.flush(30) == 0
    pipeline = drain(any_settings)
    reader = StoreReader(connect_store(any_settings.store_dsn))
    assert [s["step"] for s in reader.steps("r-poison")] == [0, 1, 2]
    letters = reader.dead_letters()
    reasons = [d["reason"] for d in letters]
    assert len(reasons) == 3 and pipeline.stats.dead_lettered == 3
    assert any("CorruptPayloadError" in r for r in reasons)
    assert any("step" in r and "greater than or equal to 0" in r for r in reasons)
    assert any("UnknownSchemaError: unknown schema fingerprint" in r for r in reasons)
    assert all(d["topic"] == topic and d["offset"] >= 0 for d in letters)


def unknown_schema_message() -> bytes:
    """Valid Avro single-object encoding of a schema trainwire does not ship."""
    schema = fastavro.parse_schema({"type": "record", "name": "Intruder", "fields": [{"name": "x", "type": "long"}]})
    body = io.BytesIO()
    fastavro.schemaless_writer(body, schema, {"x": 7})
    fp = bytes.fromhex(fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"))
    return MAGIC + fp + body.getvalue()


def test_a_store_outage_is_retried_from_the_last_commit(local_settings):
    runs = run_jobs(local_settings, [None, "nan"])
    pipeline = build_ingest(local_settings, on_alert=lambda alert: None)
    write, failures = pipeline._writer.write, iter(["refused", "ack lost"])

    def flaky_write(rows, dead_letters):
        failure = next(failures, None)
        if failure == "refused":
            raise StoreWriteError("insert into ClickHouse failed: connection refused")
        inserted = write(rows, dead_letters)
        if failure == "ack lost":  # stored, but the consumer cannot know: it must not insert the batch twice
            raise StoreWriteError("insert into ClickHouse failed: connection reset")
        return inserted

    pipeline._writer.write = flaky_write
    pipeline.drain(idle_seconds=2.0)
    pipeline.close()
    reader = StoreReader(connect_store(local_settings.store_dsn))
    assert pipeline.stats.retries == 2
    assert reader.events_stored([r.run_id for r in runs]) == sum(r.events_emitted for r in runs)
    raw = connect_store(local_settings.store_dsn).query("SELECT count() FROM steps").result_rows[0][0]
    assert raw == reader.event_counts()["steps"]  # without FINAL: no step inserted twice
    assert len([a for a in reader.incidents() if a["rule"] == "loss_not_finite"]) == 1


def test_metrics_endpoint_reports_the_ingest(local_settings):
    import socket
    import urllib.request

    runs = run_jobs(local_settings, [None])
    pipeline = build_ingest(local_settings, on_alert=lambda alert: None)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    pipeline.metrics.serve(port)
    pipeline.drain(idle_seconds=1.0)
    pipeline.close()
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and line[0] != "#"}
    assert values["trainwire_ingest_stored_total"] == runs[0].events_emitted
    assert values["trainwire_ingest_consumed_total"] == runs[0].events_emitted
    assert values["trainwire_ingest_insert_seconds_count"] >= 1 and "trainwire_ingest_lag" in values
