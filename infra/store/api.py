"""The read API over HTTP on loopback, for when another process owns the embedded store.

chdb lets one process open a data directory. `trainwire up` on the embedded defaults is that process, so it
also serves the read API on 127.0.0.1 and writes the address to `$TRAINWIRE_HOME/up.json`; the CLI's read
commands in other processes find it there and ask over HTTP. Results are JSON (timestamps ISO 8601 UTC).

Loopback is not a boundary: every web page the operator opens and every local user can reach it, and its actions
archive models. So (docs/security.md) every request carries the token `up` writes to `$TRAINWIRE_HOME/up.token`
(readable by the owner only), the Host must be this server's own address (no DNS rebinding), a POST must be
`application/json` with a bounded body (a web page cannot send that without a CORS preflight, which is refused),
and a client gets `REQUEST_SECONDS` to send its request.
"""

from __future__ import annotations

import hmac
import json
import math
import os
import secrets
import socket
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable
from datetime import date, datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from trainwire.infra.redact import redact_text

from .read import StoreReader
from .silences import SilenceBook

TOKEN_FILE = "up.token"
MAX_BODY_BYTES = 1 << 20
REQUEST_SECONDS = 10.0  # to send the whole request: a slow or stalled client is dropped after this
MAX_CONNECTIONS = 32  # served at once; more are answered 503 at once

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
    "unvouched_transitions": {"run_id": str},
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


def _strings(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"expected a list of strings, got {value!r:.80}")
    return value


def _text_map(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError(f"expected an object of strings, got {value!r:.80}")
    return value


def _time(value: Any) -> datetime:
    return datetime.fromisoformat(str(value))


# The columnar reads (read.py, ColumnarReads) served as Arrow IPC streams on GET /arrow/NAME, each argument a JSON
# value in the query string (`run_ids=["a","b"]`): names and tags may hold commas.
ARROW_METHODS: dict[str, dict[str, Callable[[Any], Any]]] = {
    "runs_table": {**{name: _strings for name in ("experiments", "teams", "statuses", "gates", "run_ids")},
                   "since": _time, "until": _time, "tags": _text_map},
    "run_candidates": {"text": str},
    "run_summary_table": {"run_id": str},
    "steps_table": {"run_ids": _strings, "metrics": _strings, "every": int},
    "evals_table": {"run_ids": _strings, "metrics": _strings},
    "curve_table": {"run_id": str, "max_points": int},
    "gpu_samples_table": {"run_ids": _strings},
    "gpu_series_table": {"run_id": str, "max_points": int},
    "alerts_table": {"run_ids": _strings},
    "open_incidents_table": {"run_id": str},
    "checkpoints_table": {"run_ids": _strings},
    "latest_gate_table": {"run_id": str},
    "registry_stages_table": {},
}
ARROW_STREAM = "application/vnd.apache.arrow.stream"


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


def write_token(home: Path) -> str:
    """A new random token in `home/up.token`, readable by its owner only from the moment it exists."""
    token = secrets.token_urlsafe(32)
    home.mkdir(parents=True, exist_ok=True)
    staged = home / f".{TOKEN_FILE}.{os.getpid()}"
    staged.unlink(missing_ok=True)
    descriptor = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(token)
    os.replace(staged, home / TOKEN_FILE)
    return token


def read_token(home: Path) -> str:
    try:
        return (home / TOKEN_FILE).read_text().strip()
    except OSError as err:
        raise RuntimeError(f"cannot read the read API's token ({home / TOKEN_FILE}): {err.strerror}") from None


class _BoundedServer(ThreadingHTTPServer):
    """At most `MAX_CONNECTIONS` requests served at once; one more is answered 503 and closed."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type, max_connections: int):
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(max_connections)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            try:
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class ReadApiServer:
    """`actions`: write operations served on POST /api/NAME with a JSON object of keyword arguments (e.g. the
    registry's transitions, which must run in the process that owns the store); a ValueError they raise is
    the caller's error (400), with its message."""

    def __init__(self, reader: StoreReader, home: Path, actions: dict[str, Callable[..., Any]] | None = None, *,
                 request_seconds: float = REQUEST_SECONDS, max_connections: int = MAX_CONNECTIONS):
        self._reader = reader
        # A replay beside `up` records what it replayed here, like every other write to the store `up` owns.
        self.actions = {"record_dead_letter_replays": reader.record_dead_letter_replays,
                        **silence_actions(reader), **(actions or {})}
        self._lock = threading.Lock()  # one query at a time through the shared client
        self._home = home
        self.request_seconds = request_seconds
        self.token = ""
        handler = type("Handler", (_Handler,), {"api": self, "timeout": request_seconds})
        self._server = _BoundedServer(("127.0.0.1", 0), handler, max_connections)
        port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{port}"
        self.hosts = frozenset({f"127.0.0.1:{port}", f"localhost:{port}"})
        self._thread = threading.Thread(target=self._server.serve_forever, name="read-api", daemon=True)

    def authorised(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.token.encode())

    def call(self, method: str, arguments: dict[str, str]) -> Any:
        spec = METHODS[method]
        kwargs = {name: spec[name](value) for name, value in arguments.items() if name in spec}
        with self._lock:
            return to_json(getattr(self._reader, method)(**kwargs))

    def call_arrow(self, method: str, arguments: dict[str, str]) -> Any:
        """A columnar read as an Arrow IPC stream; an argument that is not its JSON value is a ValueError."""
        import pyarrow as pa

        spec = ARROW_METHODS[method]
        try:
            kwargs = {name: spec[name](json.loads(value)) for name, value in arguments.items() if name in spec}
        except (TypeError, ValueError) as err:
            raise ValueError(f"bad argument for {method}: {err}") from None
        with self._lock:
            table = getattr(self._reader, method)(**kwargs)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        return sink.getvalue()  # a pyarrow.Buffer: sent as it is, never copied into bytes

    def act(self, action: str, arguments: dict[str, Any]) -> Any:
        with self._lock:
            return to_json(self.actions[action](**arguments))

    def start(self) -> ReadApiServer:
        self.token = write_token(self._home)
        self._thread.start()
        (self._home / "up.json").write_text(json.dumps({"pid": os.getpid(), "api": self.url}))
        return self

    def stop(self) -> None:
        (self._home / "up.json").unlink(missing_ok=True)
        (self._home / TOKEN_FILE).unlink(missing_ok=True)
        self._server.shutdown()
        self._server.server_close()


class _Handler(BaseHTTPRequestHandler):
    api: ReadApiServer

    def setup(self) -> None:
        super().setup()  # sets the socket timeout (`timeout`): a client silent that long is dropped
        # …and one that trickles bytes is dropped once the whole request took longer than that
        self._reading = threading.Timer(self.api.request_seconds, self._drop)
        self._reading.daemon = True
        self._reading.start()

    def _drop(self) -> None:
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def finish(self) -> None:
        self._reading.cancel()
        super().finish()

    def _refused(self) -> bool:
        """Answers and returns True when the request is not this server's to serve."""
        if self.headers.get("Host", "").lower() not in self.api.hosts:  # DNS rebinding: a name that is not ours
            self._reply(403, {"error": "Host must be this server's loopback address"})
        elif not self.api.authorised(self.headers.get("Authorization", "")):
            self._reply(401, {"error": f"missing or wrong token: send Authorization: Bearer <the token in "
                                      f"$TRAINWIRE_HOME/{TOKEN_FILE}>"})
        else:
            return False
        return True

    def do_GET(self) -> None:  # noqa: N802 (the http.server name)
        self._reading.cancel()
        if self._refused():
            return
        url = urllib.parse.urlsplit(self.path)
        if url.path.startswith("/arrow/"):
            self._arrow(url)
            return
        method = url.path.removeprefix("/api/")
        if method not in METHODS:
            self._reply(404, {"error": f"unknown read method {method!r}"})
            return
        try:
            result = self.api.call(method, dict(urllib.parse.parse_qsl(url.query)))
        except Exception as err:  # a failed query is the caller's answer, not the server's death
            self._reply(500, {"error": redact_text(f"{type(err).__name__}: {err}")})
            return
        self._reply(200, result)

    def _arrow(self, url: urllib.parse.SplitResult) -> None:
        method = url.path.removeprefix("/arrow/")
        if method not in ARROW_METHODS:
            self._reply(404, {"error": f"unknown columnar read {method!r}"})
            return
        try:
            data = self.api.call_arrow(method, dict(urllib.parse.parse_qsl(url.query)))
        except ValueError as err:  # the caller's: a bad argument, a metric the runs never logged
            self._reply(400, {"error": redact_text(str(err))})
            return
        except Exception as err:
            self._reply(500, {"error": redact_text(f"{type(err).__name__}: {err}")})
            return
        self.send_response(200)
        self.send_header("Content-Type", ARROW_STREAM)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802
        if self._refused() or (body := self._body()) is None:
            return
        action = urllib.parse.urlsplit(self.path).path.removeprefix("/api/")
        if action not in self.api.actions:
            self._reply(404, {"error": f"unknown action {action!r}"})
            return
        try:
            arguments = json.loads(body or b"{}")
            if not isinstance(arguments, dict):
                raise ValueError("the body must be a JSON object of arguments")
            result = self.api.act(action, arguments)
        except (ValueError, TypeError) as err:
            self._reply(400, {"error": redact_text(str(err))})
            return
        except Exception as err:
            self._reply(500, {"error": redact_text(f"{type(err).__name__}: {err}")})
            return
        self._reply(200, result)

    def _body(self) -> bytes | None:
        """The POST body, or None once the request was refused: only JSON (a web page cannot send that across
        origins without a preflight), with its length given, up to `MAX_BODY_BYTES`."""
        content_type = self.headers.get("Content-Type", "").partition(";")[0].strip().lower()
        length = self.headers.get("Content-Length", "")
        if content_type != "application/json":
            self._reply(415, {"error": "a POST must be Content-Type: application/json"})
        elif not length.isdigit():
            self._reply(411, {"error": "a POST needs a Content-Length"})
        elif int(length) > MAX_BODY_BYTES:
            self._reply(413, {"error": f"the body is over {MAX_BODY_BYTES} bytes"})
        else:
            body = self.rfile.read(int(length))
            self._reading.cancel()
            return body
        self.close_connection = True
        return None

    def _reply(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_args) -> None:
        pass


class RemoteReader:
    """The read methods of `METHODS`, answered by the `trainwire up` process that owns the store `home` holds."""

    def __init__(self, url: str, home: Path):
        self.url = url
        self._headers = {"Authorization": f"Bearer {read_token(home)}"}

    def __getattr__(self, method: str):
        if method not in METHODS:
            raise AttributeError(method)

        def call(**kwargs: Any) -> Any:
            query = urllib.parse.urlencode({k: _query_value(v) for k, v in kwargs.items() if v is not None})
            try:
                request = urllib.request.Request(f"{self.url}/api/{method}?{query}", headers=self._headers)
                with urllib.request.urlopen(request, timeout=30) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as err:
                raise RuntimeError(_refusal(err)) from None

        return call

    def arrow(self, method: str, **kwargs: Any):
        """A columnar read (ARROW_METHODS) as a `pyarrow.Table`; the server's refusal of an argument (400) comes
        back as a ValueError with its message."""
        import pyarrow as pa

        if method not in ARROW_METHODS:
            raise AttributeError(method)
        query = urllib.parse.urlencode({name: json.dumps(value.isoformat() if isinstance(value, datetime) else value)
                                        for name, value in kwargs.items() if value is not None})
        request = urllib.request.Request(f"{self.url}/arrow/{method}?{query}", headers=self._headers)
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                return pa.ipc.open_stream(response.read()).read_all()
        except urllib.error.HTTPError as err:
            raise (ValueError if err.code == 400 else RuntimeError)(_refusal(err)) from None

    def act(self, action: str, **arguments: Any) -> Any:
        """A write action of the `up` process; its refusal (400) comes back as a ValueError with its message."""
        request = urllib.request.Request(f"{self.url}/api/{action}", data=json.dumps(arguments).encode(),
                                         headers={**self._headers, "Content-Type": "application/json"},
                                         method="POST")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            raise (ValueError if err.code in (400, 404) else RuntimeError)(_refusal(err)) from None


def _refusal(err: urllib.error.HTTPError) -> str:
    try:
        return json.loads(err.read()).get("error", str(err))
    except ValueError:  # not our JSON (a 503 for too many connections)
        return str(err)


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
    url = info.get("api", "")
    return url if url.startswith("http://127.0.0.1:") else None  # the token goes to loopback only
