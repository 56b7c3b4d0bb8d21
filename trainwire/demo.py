"""`trainwire demo`: simulated concurrent fine-tuning jobs through the whole pipeline."""

from __future__ import annotations

import sys
import threading
import time
import uuid
from dataclasses import dataclass

from trainwire.consumers.alerting.service import build_alerting, run_alerting
from trainwire.consumers.service import build_ingest, run_ingest
from trainwire.infra.config import Settings
from trainwire.infra.redact import redact_url
from trainwire.infra.store import connect_store
from trainwire.infra.store.read import StoreReader
from trainwire.producers import init
from trainwire.producers.run import Run
from trainwire.producers.simulate import (FAULTS, JobPlan, SimulatedGpus, checkpoint_path, run_job,
                                          simulated_artifacts, simulated_lineage)

# The NaN job opts into the stop switch; its steps after the NaN take at least this long in all, so that the switch
# (ingest, detector, alert consumer, control topic: a second or two) stops it even when steps take 5 ms.
DIVERGED_SECONDS = 30.0


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
    stopped: list[dict]  # the runs trainwire's stop switch stopped: run_id, run_name, step, reason

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


@dataclass
class DemoJob:
    run: Run
    plan: JobPlan
    thread: threading.Thread | None = None
    last_step: int = 0  # the last step trained, once the job has ended


def start_jobs(settings: Settings, jobs: int, steps: int, faults: list[str], step_seconds: float,
               stop: threading.Event) -> list[DemoJob]:
    """One thread per job. Run names end in a suffix of this demo's own (`job-0-nan-3fa9c1`), so the runs of two
    demos in one store can be told apart by name."""
    demo_id = uuid.uuid4().hex[:6]
    started = []
    for i in range(jobs):
        fault = faults[i] if i < len(faults) else None
        run = init("demo-sft", f"job-{i}{'-' + fault if fault else ''}-{demo_id}",
                   {"learning_rate": 2e-4, "lora_rank": 16, "lora_alpha": 32, "batch_size": 8, "job": i},
                   settings=settings, gpu_source=SimulatedGpus(seed=i), total_steps=steps, total_epochs=3.0,
                   stop_on_block=fault == "nan", **simulated_lineage(i))
        job = DemoJob(run, JobPlan(steps=steps, step_seconds=step_seconds, fault=fault, seed=i,
                                   diverged_seconds=DIVERGED_SECONDS if fault == "nan" else 0.0))
        job.thread = threading.Thread(target=drive, args=(job, stop), name=f"demo-job-{i}", daemon=True)
        started.append(job)
    for job in started:
        job.thread.start()
    return started


def drive(job: DemoJob, stop: threading.Event) -> None:
    """Train the job to its end, to a stop by trainwire (said here, as it happens) or to Ctrl-C (`stop`)."""
    run = job.run
    job.last_step = run_job(run, job.plan, stop)
    run.finish("stopped" if stop.is_set() else "completed", artifacts=simulated_artifacts(run.run_id, job.last_step))
    if run.should_stop:
        _progress(f"  run {run.run_name} stopped by trainwire at step {job.last_step} ({run.stop_reason}); "
                  f"final checkpoint {checkpoint_path(run, job.last_step)}")


def wait_for_jobs(jobs: list[DemoJob], report_every: float | None) -> None:
    """Until every job has ended, saying how many have every `report_every` seconds (None: quietly)."""
    for job in jobs:
        while job.thread.is_alive():
            job.thread.join(timeout=report_every)
            if job.thread.is_alive() and report_every:
                done = sum(not j.thread.is_alive() for j in jobs)
                _progress(f"  jobs finished {done}/{len(jobs)}, events sent {events_sent(jobs)}")


def events_sent(jobs: list[DemoJob]) -> int:
    return sum(job.run.events_emitted for job in jobs)


def all_finished(jobs: list[DemoJob]) -> str:
    stopped = sum(job.run.should_stop for job in jobs)
    return (f"all {len(jobs)} jobs finished{f' ({stopped} stopped by trainwire)' if stopped else ''}, "
            f"{events_sent(jobs)} events sent")


def announce_when_finished(jobs: list[DemoJob], url: str, stop: threading.Event) -> None:
    """While the dashboard serves, tell the user the jobs are done and the demo has not hung: it serves on."""
    wait_for_jobs(jobs, report_every=None)
    if not stop.is_set():  # not ended by Ctrl-C
        _progress(f"{all_finished(jobs)}; the dashboard keeps serving on {url} until Ctrl-C")


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
    demo_jobs = start_jobs(settings, jobs, steps, faults, step_seconds, stop_jobs)
    transport = f"kafka://{settings.kafka}" if settings.kafka else f"sqlite://{settings.local_log_path}"
    _progress(f"trainwire demo: {jobs} jobs × {steps} steps → {transport} → {redact_url(settings.store_dsn)}")
    if not headless:
        from trainwire.dashboard.serve import dashboard_url, serve_dashboard

        threading.Thread(target=announce_when_finished, args=(demo_jobs, dashboard_url(settings, port), stop_jobs),
                         name="demo-jobs-done", daemon=True).start()
        serve_dashboard(settings, port)  # says its URL
        stop_jobs.set()
    wait_for_jobs(demo_jobs, report_every=2.0)
    if headless:
        _progress(f"{all_finished(demo_jobs)}; waiting until every event is stored")
    produced = events_sent(demo_jobs)
    reader = StoreReader(connect_store(settings.store_dsn))
    run_ids = [job.run.run_id for job in demo_jobs]
    stored = wait_stored(reader, run_ids, produced, timeout=120)
    stop_ingest.set()
    ingest.join(timeout=30)
    stop_alerts.set()
    paging.join(timeout=60)
    alerts = [{"run_id": a["run_id"], "rule": a["rule"], "severity": a["severity"], "step": a["step"],
               "state": a["state"]} for a in reader.incidents(run_ids)]
    stopped = [{"run_id": job.run.run_id, "run_name": job.run.run_name, "step": job.last_step,
                "reason": job.run.stop_reason} for job in demo_jobs if job.run.should_stop]
    return DemoReport(produced, stored, run_ids, alerts, redact_url(settings.store_dsn), transport,
                      pipeline.stats.dead_lettered, round(time.monotonic() - started, 2), stopped)
