"""Pages people trust, end to end on the real broker and real HTTP: SDK runs → ingest and detectors → alerts
topic → the alert consumer → sinks. A run and rule that flaps is one page and one resolution while every crossing is
stored; a storm of runs going NaN at once is a handful of pages per sink that list every run, each run's alert
stored (the 200-run version is benchmarks/page_storm_bench.py)."""

import math
import time

import pytest

from tests.paging_fakes import running
from tests.recording_server import RecordingServer
from trainwire.consumers.alerting.service import build_alerting, run_alerting
from trainwire.consumers.service import build_ingest, run_ingest
from trainwire.infra.alerting_settings import AlertingSettings, SinkSettings
from trainwire.infra.store import connect_store
from trainwire.infra.store.read import StoreReader
from trainwire.producers import init

pytestmark = pytest.mark.kafka
WAIT = 30.0
STORM_RUNS = 30
CYCLES = 6  # the flapping run's NaN episodes


def with_paging(settings, sinks, **keys):
    return settings.model_copy(update={"alerting": AlertingSettings(sinks=sinks, **keys)})


def stored_alerts(settings, run_ids, rule) -> list[dict]:
    client = connect_store(settings.store_dsn)
    try:
        return [a for a in StoreReader(client).alerts() if a["run_id"] in run_ids and a["rule"] == rule]
    finally:
        client.close()


def wait_until(condition, timeout=WAIT, what="the condition"):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return result


def log_a_flapping_run(settings) -> str:
    """A loss that goes NaN for two steps, then is finite for six, six times over: six incidents, each resolved."""
    with init("flapping", team="nlp", settings=settings, sample_gpus=False) as run:
        step = 0
        for _ in range(CYCLES):
            for bad in (True, True, False, False, False, False, False, False):
                step += 1
                run.log_step(step, loss=math.nan if bad else 2.0 - step * 0.01, grad_norm=1.0, learning_rate=1e-4)
    return run.run_id


def test_a_flapping_run_and_rule_pages_once_and_resolves_once_while_every_crossing_is_stored(kafka_settings):
    with RecordingServer() as server:
        settings = with_paging(kafka_settings, [SinkSettings(kind="webhook", url=f"{server.url}/hook")],
                               flap_threshold=3, flap_settle_seconds=2.0, resolve_hold_seconds=3.0)
        with running(run_ingest, build_ingest(settings, on_alert=lambda alert: None)), \
                running(run_alerting, build_alerting(settings)):
            run_id = log_a_flapping_run(settings)
            crossings = wait_until(lambda: len(found := stored_alerts(settings, {run_id}, "loss_not_finite"))
                                   >= 2 * CYCLES and found, what="every crossing stored")
            pages = server.wait_for(2, WAIT, path="/hook")
            time.sleep(2.0)  # anything more would have come by now
            pages = server.bodies("/hook")

    assert sorted(state for state in (a["state"] for a in crossings)) == ["firing"] * CYCLES + ["resolved"] * CYCLES
    assert [(p["rule"], p["state"]) for p in pages] == [("loss_not_finite", "firing"), ("loss_not_finite", "resolved")]
    firing, resolved = pages
    assert firing["dedup_key"] == resolved["dedup_key"] == f"{run_id}/loss_not_finite/1"
    assert f"flapping: {2 * CYCLES} transitions" in resolved["message"]


def start_storm_runs(settings) -> list:
    runs = [init("storm", team="nlp", settings=settings, sample_gpus=False) for _ in range(STORM_RUNS)]
    for run in runs:
        for step in (1, 2, 3):
            run.log_step(step, loss=2.0 - step * 0.1, grad_norm=1.0, learning_rate=1e-4)
    return runs


def runs_listed(path: str, body) -> set[str]:
    """The runs a page names, whatever its sink and whether it is one incident or a bundle."""
    if path == "/hook":
        return set(body.get("runs") or [body["run_id"]])
    if path == "/v2/enqueue":
        details = body["payload"]["custom_details"]
        return set(details.get("runs") or [body["payload"]["source"]])
    if path == "/api/v2/alerts":
        return {alert["labels"]["run_id"] for alert in body}
    text = body["text"] + " ".join(e["text"] for b in body["blocks"] if b["type"] == "context" for e in b["elements"])
    return {word.strip(",.:()") for word in text.replace(",", " ").split() if len(word.strip(",.:()")) == 36}


SINK_PATHS = ("/hook", "/v2/enqueue", "/slack", "/api/v2/alerts")


def test_a_storm_of_runs_going_nan_at_once_pages_each_sink_a_handful_of_times_listing_every_run(kafka_settings):
    with RecordingServer() as server:
        settings = with_paging(kafka_settings, [
            SinkSettings(kind="webhook", url=f"{server.url}/hook"),
            SinkSettings(kind="pagerduty", url=f"{server.url}/v2/enqueue", routing_key="R0UT1NG",
                         severities=("critical", "block")),
            SinkSettings(kind="slack", url=f"{server.url}/slack"),
            SinkSettings(kind="alertmanager", url=server.url)])
        with running(run_ingest, build_ingest(settings, on_alert=lambda alert: None)), \
                running(run_alerting, build_alerting(settings)):
            runs = start_storm_runs(settings)
            run_ids = {run.run_id for run in runs}
            first_nan = time.time()
            for run in runs:  # the shard every run reads goes bad: all of them within a second or two
                run.log_step(4, loss=math.nan, grad_norm=1.0, learning_rate=1e-4)
            for run in runs:
                run.finish()

            def every_sink_named_every_run():
                named = {path: set() for path in SINK_PATHS}
                for request in list(server.received):
                    named[request.path] |= runs_listed(request.path, request.body)
                return all(named[path] >= run_ids for path in SINK_PATHS)

            wait_until(every_sink_named_every_run, timeout=45, what="every sink to name every run")
            time.sleep(2.0)
            stored = stored_alerts(settings, run_ids, "loss_not_finite")

    by_path = {path: [r for r in server.received if r.path == path] for path in SINK_PATHS}
    for path, requests in by_path.items():
        assert 1 <= len(requests) <= 4, f"{path}: {len(requests)} pages for a storm of {STORM_RUNS} runs"
        listed = [runs_listed(path, r.body) for r in requests]
        assert set().union(*listed) == run_ids, path
        assert sum(map(len, listed)) == STORM_RUNS, f"{path}: a run named on two pages"
    first_page = min(r.at for r in server.received)
    assert first_page - first_nan < 5.0, "the storm's first page goes at once"
    batch = max(by_path["/hook"], key=lambda r: len(r.body.get("runs", [])))
    assert batch.body["page"] == "group" and batch.body["count"] == len(batch.body["runs"]) > 1
    assert f"loss_not_finite on {len(batch.body['runs'])} runs (storm)" in batch.body["summary"]
    assert {(a["run_id"], a["state"]) for a in stored} == {(r, "firing") for r in run_ids}, "every run's alert stored"
