"""Full-resolution history through the public read API (trainwire/read.py), in-process and through `trainwire up`.

Fills a fresh embedded store (chdb) with one run per size (10k, 100k and 1M steps by default; 4 metrics per step:
loss with some NaN, learning rate, grad norm, tokens/s), all made inside ClickHouse by INSERT … SELECT from
numbers(), then times each fetch (median of several, after one warm-up):
  - in-process: `tw.connect(dsn="chdb://…")`, then `store.steps(RUN)` as pandas and as Arrow, and with the four
    logged metrics named;
  - through a real `trainwire up --no-dashboard` owning the store: `tw.connect(home=…)` reads over its loopback
    Arrow IPC route;
  - beside them, at 100k steps, what the same fetch cost before (the internal `StoreReader.steps` rows in-process,
    and `up`'s JSON read API), measured in the same run.
MLflow is not installed here: its figure in the result is the one issue 18 quotes, marked as such.

    .venv/bin/python benchmarks/history_bench.py [--sizes 10000,100000,1000000]

Run by hand, never in CI. Writes results/history.json.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from common import cpu_seconds, source, start_up_in, write_result

import trainwire.read as tw
from trainwire.infra.store import connect_store, migrate
from trainwire.infra.store.api import RemoteReader, running_api
from trainwire.infra.store.read import StoreReader

METRICS = ["loss", "learning_rate", "grad_norm", "tokens_per_s"]
MLFLOW_QUOTED = {"what": "MLflow get_metric_history, one metric, 100k points", "median_s": 5.6,
                 "source": "issue 18's own measurement on this machine kind; not measured here (MLflow is not "
                           "installed)"}


def run_id(size: int) -> str:
    return f"00000000-0000-4000-8000-{size:012d}"


def fill(dsn: str, sizes: list[int]) -> dict:
    client = connect_store(dsn)
    migrate(client)
    started = time.perf_counter()
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    for size in sizes:
        params = {"run_id": run_id(size), "n": size, "now": now}
        client.command("""
            INSERT INTO run_started (event_id, run_id, experiment, team, host, seq, ts, run_name, user,
                                     hyperparameters_json, total_steps)
            VALUES (concat('rs-', {run_id:String}), {run_id:String}, 'history-bench', 'bench', 'node-0', 0,
                    {now:DateTime64(3, 'UTC')} - toIntervalSecond({n:UInt64}), concat('steps-', toString({n:UInt64})),
                    'bench', '{"learning_rate": 0.0002}', {n:UInt64})""", parameters=params)
        client.command("""
            INSERT INTO steps (event_id, run_id, experiment, team, host, seq, ts, step, loss, learning_rate,
                               grad_norm, tokens_per_s)
            SELECT concat({run_id:String}, '-', toString(s)), {run_id:String}, 'history-bench', 'bench', 'node-0', s,
                   {now:DateTime64(3, 'UTC')} - toIntervalSecond({n:UInt64}) + toIntervalMillisecond(s * 100), s,
                   if(s % 997 = 0, nan, 0.5 + 2.5 * exp(-s / ({n:UInt64} / 4)) + (cityHash64(s) % 1000) / 20000),
                   2e-4 * cos(s / {n:UInt64}), 0.8 + (cityHash64(s, 1) % 1000) / 1000, 3000 + cityHash64(s, 2) % 400
            FROM (SELECT number + 1 AS s FROM numbers({n:UInt64}))""", parameters=params)
    seconds = time.perf_counter() - started
    client.close()
    return {"seconds": round(seconds, 1), "steps": {str(size): size for size in sizes}}


def timed(call: Callable[[], object], repeat: int, server_pid: int | None = None) -> dict:
    """Wall time per call, and the CPU time a call costs on average: this process's (in-process, ClickHouse's
    work is in it: chdb runs in its threads) plus, through `up`, the `up` process's. On a machine shared with other
    work the CPU time says what a call costs better than the wall clock, which also counts waiting for a core."""
    rows = len(call())  # warm: first touch of parts and marks
    wall = []
    started_cpu, started_server = time.process_time(), cpu_seconds(server_pid)
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        wall.append((time.perf_counter() - started) * 1000)
    cpu = time.process_time() - started_cpu + cpu_seconds(server_pid) - started_server
    wall.sort()
    return {"rows": rows, "n": repeat, "median_ms": round(statistics.median(wall), 1), "min_ms": round(wall[0], 1),
            "max_ms": round(wall[-1], 1), "cpu_per_call_ms": round(cpu * 1000 / repeat, 1)}


def repeats(size: int) -> int:
    return 30 if size <= 10_000 else 15 if size <= 100_000 else 5


def fetches(store: tw.Store, size: int) -> dict[str, Callable[[], object]]:
    rid = run_id(size)
    return {"steps(run) pandas": lambda: store.steps(rid),
            "steps(run) arrow": lambda: store.steps(rid, as_arrow=True),
            "steps(run, 4 metrics) pandas": lambda: store.steps(rid, METRICS)}


def measure(store: tw.Store, sizes: list[int], server_pid: int | None = None) -> dict:
    results = {}
    for size in sizes:
        results[str(size)] = {name: timed(call, repeats(size), server_pid)
                              for name, call in fetches(store, size).items()}
        print(f"  {store.via} {size:>9,} steps: "
              + ", ".join(f"{k} {v['median_ms']} ms" for k, v in results[str(size)].items()), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="history-bench-") as tmp:
        home = Path(tmp) / "home"
        dsn = f"chdb://{home / 'chdb'}"
        print(f"filling {', '.join(f'{s:,}' for s in sizes)} steps …", flush=True)
        filled = fill(dsn, sizes)
        baseline_size = 100_000 if 100_000 in sizes else sizes[0]
        with tw.connect(dsn=dsn, home=home) as store:
            in_process = measure(store, sizes)
        client = connect_store(dsn)
        rows_in_process = timed(lambda: StoreReader(client).steps(run_id(baseline_size)), repeats(baseline_size))
        client.close()
        up = start_up_in(home, {})
        try:
            with tw.connect(home=home) as store:
                assert store.via == "up", store.via
                through_up = measure(store, sizes, up.pid)
            remote = RemoteReader(running_api(home), home)
            json_through_up = timed(lambda: remote.steps(run_id=run_id(baseline_size)), 5, up.pid)
        finally:
            up.send_signal(signal.SIGTERM)
            up.wait(60)
    result = {
        "what": "one run's steps (4 metrics logged) at full resolution through trainwire.read, median of n after a "
                "warm-up; wall time of the call (RUN resolved each time, pandas conversion included where it says "
                "pandas) and the CPU time a call costs on average (this process's, plus the up process's through "
                "up; its idle ingest and alert threads included)",
        "source": source(), "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "fill": filled, "in_process": in_process, "through_up": through_up,
        "before_this_api": {"steps": baseline_size,
                            "StoreReader.steps rows in-process": rows_in_process,
                            "up JSON read API (RemoteReader.steps)": json_through_up},
        "mlflow_quoted": MLFLOW_QUOTED,
        "targets": {"100k in-process median_ms": 50, "100k through up median_ms": 200},
    }
    print(f"wrote {write_result('history', result)}")


if __name__ == "__main__":
    main()
