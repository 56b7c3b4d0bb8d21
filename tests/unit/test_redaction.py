"""No credential is printed, logged or stored in clear (issue 15, item 9): sink URLs, routing keys and headers in
`trainwire alerts test`, the outbox and `alerts status`; DSNs in configuration errors and in `trainwire demo`."""

import json
import logging
import sqlite3
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from trainwire.cli import main
from trainwire.consumers.alerting.dispatcher import Dispatcher
from trainwire.consumers.alerting.outbox import Outbox
from trainwire.consumers.alerting.service import outbox_path
from trainwire.consumers.alerting.sinks import build_sinks
from trainwire.infra.config import ConfigError, load_settings
from trainwire.infra.redact import redact_headers, redact_text, redact_url
from trainwire.schemas import Alert

SECRETS = ("hunter2", "s3cret", "XXXXSECRET", "R0UT1NGSECRET", "B3ARERSECRET")


@pytest.mark.parametrize("url, redacted", [
    ("http://user:hunter2@127.0.0.1:1/hook?token=s3cret", "http://user:***@127.0.0.1:1/hook?token=***"),
    ("https://hooks.slack.com/services/T000/B000/XXXXSECRET", "https://hooks.slack.com/services/***"),
    ("https://discord.com/api/webhooks/1234/abcDEF-s3cret", "https://discord.com/api/***"),
    ("https://ops.example/hook?api_key=s3cret&routing_key=s3cret&sig=s3cret&team=nlp",
     "https://ops.example/hook?api_key=***&routing_key=***&sig=***&team=nlp"),
    ("https://s3cret-0123456789abcdef@ci.example/x", "https://***@ci.example/x"),
    ("https://ops.example/0123456789abcdefs3cret", "https://ops.example/***"),
    ("http://default:hunter2@ch:8123/db?password=hunter2&compress=1",
     "http://default:***@ch:8123/db?password=***&compress=1"),
    ("chdb:///home/me/.trainwire/chdb", "chdb:///home/me/.trainwire/chdb"),
    ("http://alertmanager:9093", "http://alertmanager:9093"),
    ("http://user:hunter2@host:99999/x", "***"),  # does not parse: nothing of it is shown
])
def test_a_url_keeps_where_it_points_and_loses_its_credentials(url, redacted):
    assert redact_url(url) == redacted


def test_text_loses_known_secrets_and_every_urls_credentials():
    text = "cannot reach http://u:hunter2@h:1/hook?token=s3cret: refused; the server said 'bad key R0UT1NGSECRET'"
    assert redact_text(text, ["R0UT1NGSECRET"]) == ("cannot reach http://u:***@h:1/hook?token=***: refused; the "
                                                    "server said 'bad key ***'")
    assert redact_text("hunter%2F2 is wrong", ["hunter/2"]) == "*** is wrong"  # URL-encoded too
    assert redact_headers({"Authorization": "Bearer x", "X-Auth-Token": "y", "X-Api-Key": "z", "Accept": "a"}) == {
        "Authorization": "***", "X-Auth-Token": "***", "X-Api-Key": "***", "Accept": "a"}


class EchoingReceiver:
    """A receiver that refuses every page and quotes the request back (path, body, headers) in its answer, as
    real services' error pages sometimes do."""

    def __init__(self):
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                echo = f"no such hook {self.path} for {body.decode()} with {dict(self.headers)}".encode()
                self.send_response(404)
                self.send_header("Content-Length", str(len(echo)))
                self.end_headers()
                self.wfile.write(echo)

            def log_message(self, *args):
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def close(self):
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture
def leaky_sinks(tmp_path, monkeypatch):
    """TRAINWIRE_HOME and TRAINWIRE_ALERTING with a secret in every place a sink can hold one."""
    receiver = EchoingReceiver()
    monkeypatch.setenv("TRAINWIRE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TRAINWIRE_ALERTING", json.dumps({"sinks": [
        {"kind": "webhook", "name": "refusing", "url": "http://user:hunter2@127.0.0.1:1/hook?token=s3cret",
         "timeout_seconds": 2},
        {"kind": "slack", "url": f"{receiver.url}/services/T000/B000/XXXXSECRET"},
        {"kind": "pagerduty", "url": f"{receiver.url}/v2/enqueue", "routing_key": "R0UT1NGSECRET"},
        {"kind": "webhook", "name": "bearer", "url": f"{receiver.url}/hook",
         "headers": {"Authorization": "Bearer B3ARERSECRET"}},
    ]}))
    yield load_settings()
    receiver.close()


def assert_no_secret(text: str) -> None:
    assert not [s for s in SECRETS if s in text], text


def test_alerts_test_and_status_show_no_sink_secret(leaky_sinks, capsys, caplog):
    assert main(["alerts", "test"]) == 1
    assert main(["alerts", "test", "--json"]) == 1
    shown = capsys.readouterr()
    assert shown.out.count("FAILED") == 8 and "no such hook" in shown.out  # the receivers' answers are shown…
    assert_no_secret(shown.out + shown.err)  # …without the secrets they quote

    caplog.set_level(logging.WARNING)
    path = outbox_path(leaky_sinks)
    path.parent.mkdir(parents=True)
    outbox = Outbox(path)
    sinks = build_sinks(leaky_sinks.alerting)
    dispatcher = Dispatcher(sinks, outbox, leaky_sinks.alerting).start()
    page = Alert(run_id="run-1", experiment="exp", rule="loss_not_finite", severity="critical", state="firing",
                 message="loss is nan", dedup_key="run-1/loss_not_finite/5")
    try:
        outbox.enqueue([(sink.name, page) for sink in sinks])
        dispatcher.wake({sink.name for sink in sinks})
        deadline = time.monotonic() + 20
        while not all(r["last_error"] for r in outbox.summary()) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        dispatcher.stop()
        outbox.close()
    assert main(["alerts", "status"]) == 1
    table = capsys.readouterr().out
    assert main(["alerts", "status", "--json"]) == 1
    as_json = capsys.readouterr()
    sink_rows = table.splitlines()[1:5]  # the table of sinks, after its header
    assert all("no such hook" in row or "cannot reach" in row for row in sink_rows)  # each sink's last error…
    assert as_json.out.count("\"last_error\": \"") == 4
    assert_no_secret(table + as_json.out + as_json.err + caplog.text)  # …without the secrets it quotes
    with sqlite3.connect(path) as db:
        assert_no_secret(json.dumps(db.execute("SELECT * FROM outbox").fetchall()))
    for stored in path.parent.iterdir():  # the database files themselves, free pages and write-ahead log too
        assert_no_secret(stored.read_bytes().decode("latin-1"))


@pytest.mark.parametrize("variable, value", [
    ("TRAINWIRE_STORE", "clickhouse://default:hunter2@ch:9000/db"),
    ("TRAINWIRE_STORE", "chdb://default:hunter2@relative/path"),
    ("TRAINWIRE_SCHEMA_REGISTRY", "ftp://registry:hunter2@sr.example"),
])
def test_a_refused_dsn_is_named_without_its_password(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=variable) as refused:
        load_settings()
    assert "hunter2" not in str(refused.value) and "***" in str(refused.value)


def test_demo_does_not_print_the_stores_password(tmp_path):
    env = {"TRAINWIRE_HOME": str(tmp_path), "TRAINWIRE_STORE": f"chdb://{tmp_path}/chdb?password=hunter2",
           "PATH": "/usr/bin:/bin"}
    demo = subprocess.run([sys.executable, "-m", "trainwire", "demo", "--headless", "--jobs", "1", "--steps", "3",
                           "--json"], env=env, capture_output=True, text=True, timeout=180)
    assert demo.returncode == 0, demo.stderr[-2000:]
    assert json.loads(demo.stdout)["store"] == f"chdb://{tmp_path}/chdb?password=***"
    assert_no_secret(demo.stdout + demo.stderr)
