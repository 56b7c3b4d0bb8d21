"""Helpers shared by the benchmarks: machine description, percentiles, result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

RESULTS = Path(__file__).with_name("results")


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_kb / 2**20, 1),
            "os": platform.platform(), "python": platform.python_version(),
            "java": subprocess.run(["java", "-version"], capture_output=True, text=True).stderr.splitlines()[0]}


def source() -> dict:
    """Which code ran: the commit, and whether the tree differed from it (a number quoted from a dirty tree is
    only as good as the change it measured)."""
    root = Path(__file__).resolve().parents[1]
    git = ["git", "-C", str(root)]
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    changed = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                             text=True).stdout.splitlines()
    return {"commit": commit, "uncommitted_changes": [line[3:] for line in changed]}


def percentiles(samples: list[float]) -> dict:
    q = statistics.quantiles(samples, n=1000, method="inclusive")  # never beyond the largest sample
    return {"n": len(samples), "median": statistics.median(samples), "p99": q[989], "p999": q[998],
            "max": max(samples)}


def write_result(name: str, result: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    result = {"benchmark": name, "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), **result}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def start_up(home: Path, kafka: str, prefix: str, settings: dict[str, str]) -> subprocess.Popen:
    """`trainwire up` (no dashboard) on Kafka in `home`/consumer with these TRAINWIRE_* `settings`, once its API
    answers."""
    return start_up_in(home / "consumer", {"TRAINWIRE_KAFKA": kafka, "TRAINWIRE_TOPIC_PREFIX": prefix, **settings})


def start_up_in(home: Path, settings: dict[str, str]) -> subprocess.Popen:
    """`trainwire up --no-dashboard` with TRAINWIRE_HOME `home` and these TRAINWIRE_* `settings` (none of the
    caller's), once its API answers."""
    from trainwire.infra.store.api import running_api

    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TRAINWIRE_")}, "TRAINWIRE_HOME": str(home),
           **settings}
    process = subprocess.Popen([sys.executable, "-m", "trainwire", "up", "--no-dashboard"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not running_api(home):
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("trainwire up did not start")
        time.sleep(0.2)
    return process


def cpu_seconds(pid: int | None) -> float:
    """User and system CPU seconds the process `pid` (all its threads) has used, from /proc; 0 for none or once it
    has exited."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serve_webhook(on_post: Callable[[str, object], None]) -> str:
    """A receiving end for pages on loopback: `on_post(path, JSON body)` for each POST, answered 200. Returns its
    base URL; it serves until the process ends."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            on_post(self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"
