"""Dashboard speed at fleet scale: each view's read-API calls and its whole render (Streamlit AppTest).

Fills a fresh embedded store (chdb) with RUNS runs × STEPS step rows, GPU samples, run ends, alerts, all made inside
ClickHouse by INSERT … SELECT from numbers() (the rollup views fill as they would on ingest), then times:
  - every read-API call each view makes, on a run in the middle of the fleet;
  - each view rendered by AppTest (the whole script: sidebar, queries, charts; no browser paint).

    .venv/bin/python benchmarks/dashboard_bench.py --runs 1000 --steps 50000
    .venv/bin/python benchmarks/dashboard_bench.py --runs 10000 --steps 50000 --store chdb:///big/disk/chdb \
        --result dashboard_10k

Run by hand on an idle machine, never in CI. Writes results/<--result>.json (dashboard.json by default), with the
load average before and after: on a shared machine the numbers are only as good as the load they ran under.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

from common import write_result

from trainwire.infra.store import connect_store, migrate
from trainwire.infra.store.audit_chain import ENTRY_COLUMNS, next_entry
from trainwire.infra.store.read import StoreReader
from trainwire.infra.store.views import FLEET_PAGE

RUNNING = 5  # the newest runs have not ended
GPUS, GPU_SECONDS = 2, 60
RUN_GAP_S = 600  # one run starts every 10 minutes
PROMOTED = 100  # every hundredth run is in the registry
ALERTS_PAGE = 100  # dashboard/views/alerts.py

_RUN_ID = "concat('00000000-0000-4000-8000-', leftPad(toString(r), 12, '0'))"
_START = "(toDateTime64({now:DateTime64(3, 'UTC')}, 3, 'UTC') - toIntervalSecond({steps:UInt64} + ({runs:UInt64} - 1 - r) * {gap:UInt64}))"


def fill(client, runs: int, steps: int, chunk_runs: int) -> dict:
    params = {"now": datetime.now(timezone.utc).replace(tzinfo=None), "steps": steps, "runs": runs,
              "gap": RUN_GAP_S, "gpus": GPUS, "gpu_s": GPU_SECONDS}
    started = time.perf_counter()
    client.command(f"""
        INSERT INTO run_started (event_id, run_id, experiment, team, host, seq, ts, run_name, user,
                                 hyperparameters_json, total_steps, seed, base_model, dataset_sha256)
        SELECT concat('rs-', toString(r)), {_RUN_ID}, concat('exp-', toString(r % 20)), concat('team-', toString(r % 5)),
               concat('node-', toString(r % 50)), 0, {_START}, concat('run-', toString(r)), 'bench',
               concat('{{"learning_rate": ', toString(1e-4 * (1 + r % 4)), ', "lora_rank": ', toString(8 * (1 + r % 3)),
                      ', "batch_size": 8}}'),
               {{steps:UInt64}}, r, 'llama-3-8b', concat('sha256:', hex(SHA256(toString(r % 20))))
        FROM (SELECT number AS r FROM numbers({{runs:UInt64}}))""", parameters=params)
    for first in range(0, runs, chunk_runs):
        count = min(chunk_runs, runs - first)
        client.command(f"""
            INSERT INTO steps (event_id, run_id, experiment, team, host, seq, ts, step, epoch, loss, learning_rate,
                               grad_norm, tokens_per_s, tokens)
            SELECT concat(toString(r), '-', toString(s)), {_RUN_ID}, concat('exp-', toString(r % 20)),
                   concat('team-', toString(r % 5)), concat('node-', toString(r % 50)), s, {_START} + toIntervalSecond(s),
                   s, 3.0 * s / {{steps:UInt64}},
                   if(r % 100 = 7 AND s > {{steps:UInt64}} * 0.8, nan,
                      0.5 + 2.5 * exp(-s / ({{steps:UInt64}} / 4)) + (cityHash64(r, s) % 1000) / 20000),
                   2e-4 * cos(s / {{steps:UInt64}}), 0.8 + (cityHash64(s, r) % 1000) / 1000,
                   3000 + cityHash64(r, s, 1) % 400, s * 800
            FROM (SELECT intDiv(number, {{steps:UInt64}}) + {first} AS r, number % {{steps:UInt64}} + 1 AS s
                  FROM numbers({count} * {{steps:UInt64}}))""", parameters=params)
        print(f"  steps: runs {first + count}/{runs} after {time.perf_counter() - started:.0f} s", flush=True)
    client.command(f"""
        INSERT INTO gpu_samples (event_id, run_id, experiment, team, host, seq, ts, rank, gpu_index, gpu_uuid, gpu_name,
                                 utilization_pct, memory_used_mb, memory_total_mb, temperature_c, power_w)
        SELECT concat('g', toString(r), '-', toString(i), '-', toString(g)), {_RUN_ID}, concat('exp-', toString(r % 20)),
               concat('team-', toString(r % 5)), concat('node-', toString(r % 50)), 100000000 + i * 8 + g,
               {_START} + toIntervalSecond(i * {{gpu_s:UInt64}}), 0, g, concat('GPU-', toString(r % 50), '-', toString(g)),
               'NVIDIA A100-SXM4-80GB', 80 + cityHash64(r, i, g) % 20, 60000 + cityHash64(i, r) % 4000, 81920,
               60 + cityHash64(g, i, r) % 20, 300 + cityHash64(r, g, i) % 80
        FROM (SELECT intDiv(number, {{gpus:UInt64}} * intDiv({{steps:UInt64}}, {{gpu_s:UInt64}})) AS r,
                     intDiv(number, {{gpus:UInt64}}) % intDiv({{steps:UInt64}}, {{gpu_s:UInt64}}) AS i,
                     number % {{gpus:UInt64}} AS g
              FROM numbers({{runs:UInt64}} * {{gpus:UInt64}} * intDiv({{steps:UInt64}}, {{gpu_s:UInt64}})))""",
                   parameters=params)
    client.command(f"""
        INSERT INTO run_ended (event_id, run_id, experiment, team, host, seq, ts, status, completed_steps, final_loss,
                               artifacts)
        SELECT concat('re-', toString(r)), {_RUN_ID}, concat('exp-', toString(r % 20)), concat('team-', toString(r % 5)),
               concat('node-', toString(r % 50)), 200000000, {_START} + toIntervalSecond({{steps:UInt64}} + 1),
               if(r % 100 = 7, 'failed', 'completed'), {{steps:UInt64}}, 0.6,
               [('adapter_model.safetensors', 33571624, concat('sha256:', hex(SHA256(toString(r)))))]
        FROM (SELECT number AS r FROM numbers({{runs:UInt64}} - {RUNNING}))""", parameters=params)
    client.command(f"""
        INSERT INTO alerts (event_id, run_id, experiment, team, ts, rule, severity, state, step, value, message,
                            dedup_key)
        SELECT concat('a-', toString(r), '-', toString(k)), {_RUN_ID}, concat('exp-', toString(r % 20)),
               concat('team-', toString(r % 5)), {_START} + toIntervalSecond({{steps:UInt64}} * 0.8 + k),
               if(r % 100 = 7, 'loss_not_finite', 'throughput_low'), if(r % 100 = 7, 'block', 'warning'),
               if(k = 0, 'firing', 'resolved'), toUInt64({{steps:UInt64}} * 0.8 + k), nan, 'bench alert',
               concat({_RUN_ID}, '-', if(r % 100 = 7, 'loss_not_finite', 'throughput_low'))
        FROM (SELECT number % {{runs:UInt64}} AS r, intDiv(number, {{runs:UInt64}}) AS k
              FROM numbers({{runs:UInt64}} * 2)) WHERE r % 10 = 7 AND (k = 0 OR r % 100 != 7)""",
                   parameters=params)
    client.command(f"""
        INSERT INTO gate_results (evaluation_id, run_id, evaluated_at, trigger, actor, baseline, overall, gates_json,
                                  inputs_json, audit_json, result_sha256)
        SELECT concat('ge-', toString(r)), {_RUN_ID}, {_START} + toIntervalSecond({{steps:UInt64}} + 2), 'run_end',
               'bench', '', if(r % 100 = 7, 'blocked', 'passed'),
               concat('[{{"gate": "G1", "name": "loss finite", "status": "', if(r % 100 = 7, 'fail', 'pass'),
                      '", "on_fail": "block", "message": "bench"}}]'), '{{}}', '', ''
        FROM (SELECT number AS r FROM numbers({{runs:UInt64}} - {RUNNING}))""", parameters=params)
    promote_runs(client, runs)
    seconds = time.perf_counter() - started
    counts = {t: client.query(f"SELECT count() FROM {t}").result_rows[0][0]
              for t in ("steps", "steps_100", "steps_1m", "gpu_samples", "gpu_1m", "runs", "alerts", "gate_results",
                        "audit_log")}
    return {"seconds": round(seconds, 1), "rows": counts}


def promote_runs(client, runs: int) -> None:
    """One run in PROMOTED moved to Candidate, as a chained (unsigned) audit log entry each: what the Fleet's
    registry stage column reads and checks entry by entry."""
    previous = None
    entries = []
    for r in range(0, runs - RUNNING, PROMOTED):
        previous = next_entry(previous, "bench", "registry.transition", f"00000000-0000-4000-8000-{r:012d}",
                              {"from": "None", "to": "Candidate", "reason": "gates passed"})
        entries.append(previous)
    client.insert("audit_log", [[getattr(e, c) for c in ENTRY_COLUMNS] for e in entries], column_names=ENTRY_COLUMNS)


def timed(call: Callable[[], object], repeat: int) -> dict:
    """Wall-clock percentiles, and the median CPU time of this process (its chdb threads included): on a machine
    shared with other work the wall clock waits for the CPU, the CPU time is the work itself."""
    call()  # warm: first-touch of parts and marks
    samples, cpu = [], []
    for _ in range(repeat):
        started, started_cpu = time.perf_counter(), time.process_time()
        call()
        samples.append((time.perf_counter() - started) * 1000)
        cpu.append((time.process_time() - started_cpu) * 1000)
    samples.sort()
    return {"p50_ms": round(statistics.median(samples), 1),
            "p95_ms": round(samples[min(len(samples) - 1, int(0.95 * len(samples)))], 1),
            "max_ms": round(samples[-1], 1), "cpu_p50_ms": round(statistics.median(cpu), 1)}


def view_calls(store: StoreReader, run_id: str, runs: list[str], host: str) -> dict[str, dict[str, Callable]]:
    now = datetime.now(timezone.utc)
    hour, day = now - timedelta(hours=1), now - timedelta(days=1)
    return {
        "every page (sidebar)": {"runs()": store.runs, "runs_digest()": store.runs_digest},
        "Fleet": {"fleet_page(all, page 1)": store.fleet_page,
                  "fleet_page(all, page 100)": lambda: store.fleet_page(offset=99 * FLEET_PAGE),
                  "fleet_page(last 24 h)": lambda: store.fleet_page(since=day),
                  "fleet_page(search 'exp-7 failed')": lambda: store.fleet_page(search="exp-7 failed"),
                  "registry_stages()": store.registry_stages, "silences()": store.silences},
        "Training": {
            "progress(run)": lambda: store.progress(run_id),
            "curve(run, all)": lambda: store.curve(run_id, max_points=500),
            "curve(run, last 1 h)": lambda: store.curve(run_id, since=hour, max_points=500),
            "evals(run)": lambda: store.evals(run_id),
            "alert_incidents(run)": lambda: store.alert_incidents(run_ids=[run_id]),
        },
        "Experiment comparison": {"compare(4 runs, all)": lambda: store.compare(runs[:4])},
        "Resources": {
            "gpu_series(run, all)": lambda: store.gpu_series(run_id=run_id),
            "gpu_series(host, all)": lambda: store.gpu_series(host=host),
            "gpu_series(run, last 1 h)": lambda: store.gpu_series(run_id=run_id, since=hour),
            "throughput(run, all)": lambda: store.throughput(run_id=run_id),
            "throughput(host, last 24 h)": lambda: store.throughput(host=host, since=day),
        },
        "Alerts": {"alert_facets()": store.alert_facets,
                   "alert_incident_counts(all)": store.alert_incident_counts,
                   "alert_incidents(all, page 1)": lambda: store.alert_incidents(limit=ALERTS_PAGE),
                   "alert_incidents(severity block, last 24 h)": lambda: store.alert_incidents(
                       severities=["block"], since=day, limit=ALERTS_PAGE),
                   "alert_flapping(all)": lambda: store.alert_flapping(3, 600),
                   "alert_storms(all)": lambda: store.alert_storms(("experiment",), 60)},
        "Audit": {"run_started(run)": lambda: store.run_started(run_id),
                  "checkpoints(run)": lambda: store.checkpoints(run_id),
                  "run_ended(run)": lambda: store.run_ended(run_id),
                  "latest_gates(run)": lambda: store.latest_gates(run_id),
                  "registry_history(run)": lambda: store.registry_history(run_id),
                  "stored_audit_record(run)": lambda: store.stored_audit_record(run_id),
                  "gpus_seen(run)": lambda: store.gpus_seen(run_id)},
    }


def render_times(dsn: str, run_id: str, repeat: int) -> dict:
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    os.environ["TRAINWIRE_STORE"] = dsn
    app = Path(__file__).resolve().parents[1] / "dashboard" / "app.py"
    at = AppTest.from_file(str(app), default_timeout=120).run()
    at = at.selectbox(key="run").select(run_id).run()
    results = {}
    for page in ("training", "fleet", "compare", "resources", "alerts", "audit"):
        def render(page=page):
            at.switch_page(f"views/{page}.py").run()
            assert not at.exception, [e.value for e in at.exception]
        results[page] = timed(render, repeat)
        print(f"  render {page}: {results[page]}", flush=True)
    st.cache_resource.clear()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=50_000, help="step rows per run")
    parser.add_argument("--chunk-runs", type=int, default=50, help="runs per INSERT … SELECT")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--store", help="the store (chdb:///path) to fill, or to reuse when it holds runs already; "
                                        "a fresh temporary one by default")
    parser.add_argument("--result", default="dashboard", help="results/<RESULT>.json")
    args = parser.parse_args()

    dsn = args.store or f"chdb://{tempfile.mkdtemp(prefix='trainwire-dashboard-bench-')}/chdb"
    client = connect_store(dsn)
    migrate(client)
    filled = Path(dsn.removeprefix("chdb://")).parent / "filled.json"  # how a reused store was filled
    load_before = os.getloadavg()
    if not client.query("SELECT count() FROM runs").result_rows[0][0]:
        print(f"filling {dsn}: {args.runs} runs × {args.steps} steps", flush=True)
        generated = {**fill(client, args.runs, args.steps, args.chunk_runs), "load_average_after": os.getloadavg()}
        filled.write_text(json.dumps(generated))
        print(f"filled in {generated['seconds']} s: {generated['rows']}", flush=True)
    generated = json.loads(filled.read_text()) if filled.exists() else None
    store = StoreReader(client)
    stored_steps = client.query("SELECT count() FROM steps").result_rows[0][0]
    listing = store.runs()
    run_id = listing[len(listing) // 2]["run_id"]
    host = listing[len(listing) // 2]["host"]
    calls = {}
    for page, reads in view_calls(store, run_id, [r["run_id"] for r in listing], host).items():
        calls[page] = {name: timed(call, args.repeat) for name, call in reads.items()}
        print(f"  {page}: {calls[page]}", flush=True)
    client.close()
    renders = render_times(dsn, run_id, args.repeat)
    path = write_result(args.result, {
        "scale": {"runs": len(listing), "step_rows": stored_steps},
        "generated": generated, "load_average": {"before": load_before, "after": os.getloadavg()},
        "read_api_calls": calls, "apptest_render": renders,
        "target": "each view renders in < 1 s (p95)",
        "met": all(r["p95_ms"] < 1000 for r in renders.values()),
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
