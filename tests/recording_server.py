"""A real HTTP server on 127.0.0.1 that records every POST it receives, standing in for PagerDuty, Slack, a webhook
receiver or Alertmanager. It can be told to fail the next N requests, or every request, with a status code, or to
answer slowly (it records a request on arrival, then waits `answer_delay` seconds before it answers)."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: object
    at: float  # time.time() on arrival
    answered: threading.Event = field(default_factory=threading.Event, compare=False, repr=False)


class RecordingServer:
    def __init__(self):
        self.received: list[Received] = []
        self.refused = 0  # requests answered with a failure
        self.fail_next = 0
        self.fail_status = 503
        self.always_status: int | None = None
        self.answer_delay = 0.0
        self._arrived = threading.Condition()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                status = server._status()
                received = Received(self.path, dict(self.headers), json.loads(body), time.time())
                if status == 200:
                    server._record(received)
                time.sleep(server.answer_delay)
                received.answered.set()  # from here on the sender may have its answer
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the sender died waiting for the answer (a crash test)

            def log_message(self, *args):
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def _status(self) -> int:
        with self._arrived:
            if self.always_status is not None or self.fail_next > 0:
                self.fail_next = max(0, self.fail_next - 1)
                self.refused += 1
                return self.always_status or self.fail_status
            return 200

    def _record(self, received: Received) -> None:
        with self._arrived:
            self.received.append(received)
            self._arrived.notify_all()

    def bodies(self, path: str | None = None) -> list:
        with self._arrived:
            return [r.body for r in self.received if path is None or r.path == path]

    def unanswered(self) -> list[Received]:
        """Requests recorded but not answered yet: their senders are waiting for the answer."""
        with self._arrived:
            return [r for r in self.received if not r.answered.is_set()]

    def wait_for(self, count: int, timeout: float = 15.0, path: str | None = None) -> list:
        """The bodies once at least `count` arrived (on `path`); fails the test after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while len([r for r in self.received if path is None or r.path == path]) < count:
                left = deadline - time.monotonic()
                assert left > 0, f"{count} requests expected on {path or 'any path'}, got {len(self.received)}"
                self._arrived.wait(left)
        return self.bodies(path)

    def __enter__(self) -> RecordingServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
