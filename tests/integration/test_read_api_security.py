"""The read/action API of `trainwire up` serves its own CLI only (issue 15, item 6): a token on every request, its own
Host, JSON POSTs with bounded bodies, slow clients dropped; and the metrics endpoint listens on loopback."""

import http.client
import json
import socket
import stat
import subprocess
import sys
import time

import pytest

from trainwire.consumers.governance import Governance, roles_for
from trainwire.consumers.metrics import IngestMetrics
from trainwire.infra.config import Settings
from trainwire.infra.store.api import MAX_BODY_BYTES, TOKEN_FILE, ReadApiServer, RemoteReader
from trainwire.infra.store.read import StoreReader

SILENCE = {"actor": "mallory", "reason": "a web page asked", "for_seconds": 3600, "rule": "loss_not_finite"}


@pytest.fixture
def home(tmp_path):
    return tmp_path / "home"


@pytest.fixture
def api(client, home):
    server = ReadApiServer(StoreReader(client), home, Governance(client, roles_for(Settings(home=home))).actions(),
                           request_seconds=1.0, max_connections=4).start()
    yield server
    server.stop()


def send(api, method, path, *, token=None, host=None, content_type=None, body=None, length=None):
    """One raw request, every header as given (http.client adds none): (status, headers, decoded body)."""
    port = int(api.url.rpartition(":")[2])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    connection.putheader("Host", host or f"127.0.0.1:{port}")
    if token is not None:
        connection.putheader("Authorization", f"Bearer {token}")
    if content_type is not None:
        connection.putheader("Content-Type", content_type)
    if body is not None or length is not None:
        connection.putheader("Content-Length", str(len(body) if length is None else length))
    connection.endheaders(body)
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, dict(response.getheaders()), json.loads(data) if data else None


def silences_and_audit(client):
    reader = StoreReader(client)
    return reader.silences(include_ended=True), len(reader.audit_log())


def test_the_token_is_the_owners_alone_and_not_in_up_json(api, home):
    token_file = home / TOKEN_FILE
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert token_file.read_text() == api.token and len(api.token) >= 32
    assert api.token not in (home / "up.json").read_text()


def test_every_request_needs_the_token(api):
    assert send(api, "GET", "/api/runs")[0] == 401
    status, headers, body = send(api, "GET", "/api/runs", token="guessed-wrong")
    assert status == 401 and "guessed-wrong" not in json.dumps(body)
    assert send(api, "GET", "/api/runs", token=api.token[:-1])[0] == 401
    assert send(api, "POST", "/api/create_silence", content_type="application/json",
                body=json.dumps(SILENCE).encode())[0] == 401
    status, headers, body = send(api, "GET", "/api/runs", token=api.token)
    assert status == 200 and body == []
    assert not [h for h in headers if h.lower().startswith("access-control-")]  # no CORS: browsers keep out


def test_a_foreign_host_is_refused_even_with_the_token(api):
    """DNS rebinding: evil.example resolves to 127.0.0.1 and the browser sends its own Host."""
    port = api.url.rpartition(":")[2]
    assert send(api, "GET", "/api/runs", token=api.token, host=f"evil.example:{port}")[0] == 403
    assert send(api, "GET", "/api/runs", token=api.token, host="127.0.0.1:1")[0] == 403
    assert send(api, "GET", "/api/runs", token=api.token, host=f"localhost:{port}")[0] == 200


def test_a_post_that_is_not_json_does_nothing(api, client):
    """A web page can send text/plain (a "simple" request) without a preflight: refused before anything runs."""
    before = silences_and_audit(client)
    body = json.dumps(SILENCE).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        assert send(api, "POST", "/api/create_silence", token=api.token, content_type=content_type,
                    body=body)[0] == 415
    archive = json.dumps({"run_id": "run-1", "actor": "mallory", "reason": "a web page asked"}).encode()
    assert send(api, "POST", "/api/registry_archive", token=api.token, content_type="text/plain",
                body=archive)[0] == 415
    assert silences_and_audit(client) == before
    status, _, created = send(api, "POST", "/api/create_silence", token=api.token,
                              content_type="application/json; charset=utf-8", body=body)
    assert status == 200 and created["rule"] == "loss_not_finite"  # the same request as JSON does it
    assert len(silences_and_audit(client)[0]) == len(before[0]) + 1


def test_bodies_are_bounded_and_need_a_length(api, client):
    before = silences_and_audit(client)
    started = time.monotonic()
    assert send(api, "POST", "/api/create_silence", token=api.token, content_type="application/json",
                length=MAX_BODY_BYTES + 1)[0] == 413  # answered from the header: the body is never read
    assert time.monotonic() - started < 1.0
    assert send(api, "POST", "/api/create_silence", token=api.token, content_type="application/json")[0] == 411
    assert silences_and_audit(client) == before


def raw_socket(api):
    return socket.create_connection(("127.0.0.1", int(api.url.rpartition(":")[2])), timeout=10)


def closed_within(sock, seconds) -> bool:
    """Whether the server closes `sock` within `seconds` (it answers nothing the client could use)."""
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
        return True
    except TimeoutError:
        return False
    except OSError:
        return True


def test_a_slow_client_is_dropped_while_others_are_served(api):
    stalled = raw_socket(api)
    stalled.sendall(b"GET /api/runs HTTP/1.1\r\nHost: ")  # half a request, then nothing
    trickling = raw_socket(api)
    trickling.sendall(b"GET /api/runs HTTP/1.1\r\n")
    started = time.monotonic()
    assert send(api, "GET", "/api/runs", token=api.token)[0] == 200  # served meanwhile
    while time.monotonic() - started < 5.0:  # one header byte every 0.2 s never lets the socket time out…
        try:
            trickling.sendall(b"X")
        except OSError:
            break
        time.sleep(0.2)
    assert time.monotonic() - started < 2.5  # …the request's deadline (1 s) ends it
    assert closed_within(stalled, 0.5) and closed_within(trickling, 0.5)


def test_connections_beyond_the_bound_are_turned_away_until_slots_free(api):
    held = [raw_socket(api) for _ in range(4)]
    time.sleep(0.2)
    with raw_socket(api) as extra:
        extra.settimeout(5)
        assert extra.recv(100).startswith(b"HTTP/1.0 503")
    for sock in held:
        assert closed_within(sock, 3.0)
    assert send(api, "GET", "/api/runs", token=api.token)[0] == 200


def test_the_cli_reader_sends_the_homes_token(api, home):
    remote = RemoteReader(api.url, home)
    assert remote.runs() == []
    created = remote.act("create_silence", **SILENCE)
    assert [s["silence_id"] for s in remote.silences()] == [created["silence_id"]]
    (home / TOKEN_FILE).write_text("stale")
    with pytest.raises(RuntimeError, match="token"):
        RemoteReader(api.url, home).runs()


def listening_address(port: int) -> str:
    """The local address of the socket listening on `port`, from the kernel's table (IPv4)."""
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, _, hex_port = local.partition(":")
        if state == "0A" and int(hex_port, 16) == port:
            return socket.inet_ntoa(bytes.fromhex(address)[::-1])
    raise AssertionError(f"nothing listens on port {port}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_metrics_listen_on_loopback_unless_told_otherwise(tmp_path, capsys):
    host, port = IngestMetrics().serve(0, Settings(home=tmp_path).metrics_host)
    assert (host, listening_address(port)) == ("127.0.0.1", "127.0.0.1")
    assert "warning" not in capsys.readouterr().err
    host, port = IngestMetrics().serve(0, "0.0.0.0")
    assert listening_address(port) == "0.0.0.0"
    [warning] = capsys.readouterr().err.splitlines()
    assert warning.startswith("trainwire: warning: metrics on 0.0.0.0:0")


def test_trainwire_up_serves_metrics_on_loopback(tmp_path):
    from beside_up import cli_env

    port = free_port()
    up = subprocess.Popen([sys.executable, "-m", "trainwire", "up", "--no-dashboard", "--metrics-port", str(port)],
                          env=cli_env(tmp_path / "home"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "home" / "up.json").exists():
            assert up.poll() is None and time.monotonic() < deadline, "trainwire up did not start"
            time.sleep(0.2)
        assert listening_address(port) == "127.0.0.1"
        metrics = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        metrics.request("GET", "/metrics")
        assert b"trainwire_ingest_consumed" in metrics.getresponse().read()
        metrics.close()
    finally:
        up.terminate()
        assert up.wait(60) == 0, up.stderr.read()[-2000:]
