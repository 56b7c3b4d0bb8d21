"""`trainwire demo`: simulated concurrent fine-tuning jobs through the whole pipeline."""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass

from trainwire.consumers.alerting.service import build_alerting, run_alerting
from trainwire.consumers.service import build_ingest, run_ingest
from trainwire.infra.config import Settings
from trainwire.infra.redact import redact_url
from trainwire.infra.store import connect_store
from trainwire.infra.store.read import StoreReader
from trainwire.producers import init
from trainwire.producers.simulate import (FAULTS, JobPlan, SimulatedGpus, run_job, simulated_artifacts,
                                          simulated_lineage)


@dataclass
class DemoReport:
    events_produced: int
    events_stored: int
    runs: list[str]
    alerts: list[dict]
    store: str
    transport: str
    dead_letters: int
    seconds: float

    @property
    def complete(self) -> bool:
        return self.events_stored == self.events_produced


def parse_faults(value: str | None) -> list[str]:
    faults = [f.strip() for f in (value or "").split(",") if f.strip()]
    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        raise ValueError(f"--inject: unknown fault {', '.join(unknown)} (choose from {', '.join(FAULTS)})")
    return faults


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def start_jobs(settings: Settings, jobs: int, steps: int, faults: list[str], step_seconds: float,
               stop: threading.Event) -> tuple[list, list[threading.Thread]]:
    runs, threads = [], []
    for i in range(jobs):
        fault = faults[i] if i < len(faults) else None
        run = init("demo-sft", f"job-{i}{'-' + fault if fault else ''}",
                   {"learning_rate": 2e-4, "lora_rank": 16, "lora_alpha": 32, "batch_size": 8, "job": i},
                   settings=settings, gpu_source=SimulatedGpus(seed=i), total_steps=steps, total_epochs=3.0,
                   **simulated_lineage(i))
        plan = JobPlan(steps=steps, step_seconds=step_seconds, fault=fault, seed=i)

        def job(run=run, plan=plan) -> None:
            run_job(run, plan, stop)
            run.finish("stopped" if stop.is_set() else "completed",
                       artifacts=simulated_artifacts(run.run_id, plan.steps))

        runs.append(run)
        threads.append(threading.Thread(target=job, name=f"demo-job-{i}", daemon=True))
    for thread in threads:
        thread.start()
    return runs, threads


def wait_stored(reader: StoreReader, run_ids: list[str], produced: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    stored = reader.events_stored(run_ids)
    while stored < produced and time.monotonic() < deadline:
        time.sleep(0.2)
        stored = reader.events_stored(run_ids)
    return stored


def run_demo(settings: Settings, *, jobs: int, steps: int, faults: list[str], headless: bool,
             step_seconds: float, port: int = 8501) -> DemoReport | None:
    started = time.monotonic()
    # a demo is short: sample GPUs and beat often enough to be seen
    settings = settings.model_copy(update={"gpu_sample_seconds": min(settings.gpu_sample_seconds, 1.0),
                                           "heartbeat_seconds": min(settings.heartbeat_seconds, 2.0)})
    pipeline = build_ingest(settings, on_alert=lambda alert: None)  # alerts page through the alert consumer
    alerting = build_alerting(settings)
    stop_ingest, stop_alerts, stop_jobs = threading.Event(), threading.Event(), threading.Event()
    ingest = threading.Thread(target=run_ingest, args=(pipeline, stop_ingest), name="ingest", daemon=True)
    paging = threading.Thread(target=run_alerting, args=(alerting, stop_alerts, 30.0), name="alerts", daemon=True)
    ingest.start()
    paging.start()
    runs, threads = start_jobs(settings, jobs, steps, faults, step_seconds, stop_jobs)
    transport = f"kafka://{settings.kafka}" if settings.kafka else f"sqlite://{settings.local_log_path}"
    _progress(f"trainwire demo: {jobs} jobs × {steps} steps → {transport} → {redact_url(settings.store_dsn)}")
    if not headless:
        from trainwire.dashboard.serve import serve_dashboard

        serve_dashboard(settings, port)  # says its URL
        stop_jobs.set()
    for thread in threads:
        while thread.is_alive():
            thread.join(timeout=2.0)
            if thread.is_alive():
                done = sum(not t.is_alive() for t in threads)
                _progress(f"  jobs finished {done}/{jobs}, events sent {sum(r.events_emitted for r in runs)}")
    produced = sum(r.events_emitted for r in runs)
    reader = StoreReader(connect_store(settings.store_dsn))
    run_ids = [r.run_id for r in runs]
    stored = wait_stored(reader, run_ids, produced, timeout=120)
    stop_ingest.set()
    ingest.join(timeout=30)
    stop_alerts.set()
    paging.join(timeout=60)
    alerts = [{"run_id": a["run_id"], "rule": a["rule"], "severity": a["severity"], "step": a["step"],
               "state": a["state"]} for a in reader.incidents(run_ids)]
    return DemoReport(produced, stored, run_ids, alerts, redact_url(settings.store_dsn), transport,
                      pipeline.stats.dead_lettered, round(time.monotonic() - started, 2))

