"""The read API over HTTP on loopback, for when another process owns the embedded store.

chdb lets one process open a data directory. `trainwire up` on the embedded defaults is that process, so it
also serves the read API on 127.0.0.1 and writes the address to `$TRAINWIRE_HOME/up.json`; the CLI's read
commands in other processes find it there and ask over HTTP. Results are JSON (timestamps ISO 8601 UTC).
"""

from __future__ import annotations

import json
import math
import os
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable
from datetime import date, datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from .read import StoreReader
from .silences import SilenceBook

# The read methods a remote caller may use, with how to parse their query-string arguments.
METHODS: dict[str, dict[str, type]] = {
    "runs": {},
    "run_summary": {"run_id": str},
    "steps": {"run_id": str},
    "evals": {"run_id": str},
    "alerts": {"run_id": str},
    "incidents": {},
    "checkpoints": {"run_id": str},
    "dead_letters": {},
    "list_dead_letters": {"since": datetime.fromisoformat, "topic": str, "reason_contains": str, "limit": int},
    # governance (infra/store/governance.py)
    "gate_results": {"run_id": str},
    "latest_gates": {"run_id": str},
    "stored_audit_record": {"run_id": str},
    "registry_history": {"run_id": str},
    "registry_stages": {},
    "audit_log": {"run_id": str},
    # dashboard views (infra/store/views.py)
    "curve": {"run_id": str, "since": datetime.fromisoformat, "until": datetime.fromisoformat, "max_points": int},
    "progress": {"run_id": str},
    "fleet": {"since": datetime.fromisoformat},
    "runs_digest": {},
    "gpu_series": {"run_id": str, "host": str, "since": datetime.fromisoformat, "until": datetime.fromisoformat,
                   "max_points": int},
    "throughput": {"run_id": str, "host": str, "since": datetime.fromisoformat, "until": datetime.fromisoformat,
                   "max_points": int},
    "compare": {"run_ids": lambda v: [x for x in v.split(",") if x], "since": datetime.fromisoformat,
                "until": datetime.fromisoformat, "max_points": int},
    "alert_incidents": {**{name: lambda v: [x for x in v.split(",") if x]
                           for name in ("run_ids", "rules", "severities", "teams", "states")},
                        "since": datetime.fromisoformat, "until": datetime.fromisoformat, "limit": int},
    "alert_facets": {},
    # paging (infra/store/read.py, migration 008)
    "silences": {"include_ended": lambda v: v.lower() in ("1", "true", "yes")},
    "alert_flapping": {"threshold": int, "window_seconds": float, "since": datetime.fromisoformat,
                       "until": datetime.fromisoformat, "limit": int},
    "alert_storms": {"group_by": lambda v: tuple(x for x in v.split(",") if x), "gap_seconds": float,
                     "since": datetime.fromisoformat, "until": datetime.fromisoformat, "min_runs": int, "limit": int},
}


def _query_value(value: Any) -> str:
    """A keyword argument as METHODS parses it back: lists comma-joined, datetimes ISO 8601."""
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def to_json(value: Any) -> Any:
    """JSON-safe copy: datetimes as ISO 8601 UTC, NaN/±Inf as the strings "NaN"/"Infinity"/"-Infinity"."""
    if isinstance(value, datetime):
        value = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
        return value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return value


class ReadApiServer:
    """`actions`: write operations served on POST /api/NAME with a JSON object of keyword arguments (e.g. the
    registry's transitions, which must run in the process that owns the store); a ValueError they raise is
    the caller's error (400), with its message."""

    def __init__(self, reader: StoreReader, home: Path, actions: dict[str, Callable[..., Any]] | None = None):
        self._reader = reader
        # A replay beside `up` records what it replayed here, like every other write to the store `up` owns.
        self.actions = {"record_dead_letter_replays": reader.record_dead_letter_replays,
                        **silence_actions(reader), **(actions or {})}
        self._lock = threading.Lock()  # one query at a time through the shared client
        self._home = home
        handler = type("Handler", (_Handler,), {"api": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="read-api", daemon=True)

    def call(self, method: str, arguments: dict[str, str]) -> Any:
        spec = METHODS[method]
        kwargs = {name: spec[name](value) for name, value in arguments.items() if name in spec}
        with self._lock:
            return to_json(getattr(self._reader, method)(**kwargs))

    def act(self, action: str, arguments: dict[str, Any]) -> Any:
        with self._lock:
            return to_json(self.actions[action](**arguments))

    def start(self) -> ReadApiServer:
        self._thread.start()
        (self._home / "up.json").write_text(json.dumps({"pid": os.getpid(), "api": self.url}))
        return self

    def stop(self) -> None:
        (self._home / "up.json").unlink(missing_ok=True)
        self._server.shutdown()


class _Handler(BaseHTTPRequestHandler):
    api: ReadApiServer

    def do_GET(self) -> None:  # noqa: N802 (the http.server name)
        url = urllib.parse.urlsplit(self.path)
        method = url.path.removeprefix("/api/")
        if method not in METHODS:
            self._reply(404, {"error": f"unknown read method {method!r}"})
            return
        try:
            result = self.api.call(method, dict(urllib.parse.parse_qsl(url.query)))
        except Exception as err:  # a failed query is the caller's answer, not the server's death
            self._reply(500, {"error": f"{type(err).__name__}: {err}"})
            return
        self._reply(200, result)

    def do_POST(self) -> None:  # noqa: N802
        action = urllib.parse.urlsplit(self.path).path.removeprefix("/api/")
        if action not in self.api.actions:
            self._reply(404, {"error": f"unknown action {action!r}"})
            return
        try:
            arguments = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            if not isinstance(arguments, dict):
                raise ValueError("the body must be a JSON object of arguments")
            result = self.api.act(action, arguments)
        except (ValueError, TypeError) as err:
            self._reply(400, {"error": str(err)})
            return
        except Exception as err:
            self._reply(500, {"error": f"{type(err).__name__}: {err}"})
            return
        self._reply(200, result)

    def _reply(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_args) -> None:
        pass


class RemoteReader:
    """The read methods of `METHODS`, answered by the `trainwire up` process that owns the store."""

    def __init__(self, url: str):
        self.url = url

    def __getattr__(self, method: str):
        if method not in METHODS:
            raise AttributeError(method)

        def call(**kwargs: Any) -> Any:
            query = urllib.parse.urlencode({k: _query_value(v) for k, v in kwargs.items() if v is not None})
            try:
                with urllib.request.urlopen(f"{self.url}/api/{method}?{query}", timeout=30) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as err:
                raise RuntimeError(json.loads(err.read()).get("error", str(err))) from None

        return call

    def act(self, action: str, **arguments: Any) -> Any:
        """A write action of the `up` process; its refusal (400) comes back as a ValueError with its message."""
        request = urllib.request.Request(f"{self.url}/api/{action}", data=json.dumps(arguments).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            message = json.loads(err.read()).get("error", str(err))
            raise (ValueError if err.code in (400, 404) else RuntimeError)(message) from None


def silence_actions(reader: StoreReader) -> dict[str, Callable[..., Any]]:
    """`trainwire alerts silence/silences/unsilence` beside `up`: served here, audited like any silence change."""
    book = SilenceBook(reader.client)
    return {name: getattr(book, name) for name in ("create_silence", "remove_silence", "list_silences")}


def running_api(home: Path) -> str | None:
    """The read API of a live `trainwire up` on this home, if there is one."""
    try:
        info = json.loads((home / "up.json").read_text())
        os.kill(info["pid"], 0)
    except (OSError, ValueError, KeyError):
        return None
    return info["api"]
