"""`trainwire up`: every consumer-side component the configuration calls for.

On the embedded defaults (local log, chdb) the store belongs to one process, so ingest, the alert consumer, the read
API and the dashboard run here together. With a ClickHouse server each component is a process of its own, as it
would be deployed: `trainwire consume` (scale it out: one per partition at most), `trainwire alerts` and
`trainwire dashboard`.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading

from trainwire.consumers.alerting.service import build_alerting, run_alerting
from trainwire.consumers.governance import Governance, roles_for
from trainwire.consumers.service import build_ingest, run_ingest
from trainwire.infra.config import Settings
from trainwire.infra.redact import redact_url
from trainwire.infra.store import connect_store
from trainwire.infra.store.api import ReadApiServer
from trainwire.infra.store.read import StoreReader


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass


def serve_metrics(pipeline, settings: Settings, port: int) -> None:
    """Ingest's Prometheus /metrics on `settings.metrics_host` (loopback unless told otherwise)."""
    host, bound = pipeline.metrics.serve(port, settings.metrics_host)
    _say(f"metrics on http://{f'[{host}]' if ':' in host else host}:{bound}/metrics")


def up_embedded(settings: Settings, port: int, dashboard: bool, metrics_port: int | None = None) -> None:
    pipeline = build_ingest(settings, on_alert=lambda alert: None)  # the alert consumer's sinks say it
    if metrics_port:
        serve_metrics(pipeline, settings, metrics_port)
    alerting = build_alerting(settings)
    stop = threading.Event()
    threads = [threading.Thread(target=run_ingest, args=(pipeline, stop), name="ingest", daemon=True),
               threading.Thread(target=run_alerting, args=(alerting, stop), name="alerts", daemon=True)]
    for thread in threads:
        thread.start()
    client = connect_store(settings.store_dsn)
    governance = Governance(client, roles_for(settings))  # registry and audit commands of other processes
    api = ReadApiServer(StoreReader(client), settings.home, actions=governance.actions()).start()
    _say(f"trainwire up (embedded): ingest from {settings.local_log_path} into {redact_url(settings.store_dsn)}")
    _say(f"alerts page through: {', '.join(sink.name for sink in alerting.sinks)}")
    _say(f"read API for other trainwire commands on {api.url}")
    try:
        if dashboard:
            from trainwire.dashboard.serve import serve_dashboard

            serve_dashboard(settings, port)  # says its URL
        else:
            _say("Ctrl-C or SIGTERM to stop")
            _wait_for_signal()
    finally:
        api.stop()
        stop.set()
        for thread in threads:
            thread.join(timeout=30)


def up_services(settings: Settings, port: int, dashboard: bool, metrics_port: int | None = None) -> int:
    consume = (["consume", "--metrics-port", str(metrics_port), "--metrics-host", settings.metrics_host]
               if metrics_port else ["consume"])
    commands = [[sys.executable, "-m", "trainwire", *consume], [sys.executable, "-m", "trainwire", "alerts"]]
    if dashboard:
        commands.append([sys.executable, "-m", "trainwire", "dashboard", "--port", str(port),
                         "--host", settings.dashboard_host])
    processes = [subprocess.Popen(command) for command in commands]
    _say(f"trainwire up: {len(processes)} processes ({', '.join(c[3] for c in commands)}); Ctrl-C to stop")
    try:
        _wait_for_signal()
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        codes = [process.wait(timeout=60) for process in processes]
    return max(codes, default=0)
