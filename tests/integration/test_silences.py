"""Silences through the real CLI beside `trainwire up` (the embedded store, the real broker, a real webhook): a
silence keeps the pages it matches from being sent, and only those; it ends on time, and the incident it held that
still fires is paged then; creating, removing and the expiry are in `trainwire audit log`; without `up`, the CLI
writes the store itself."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import pytest

from beside_up import running_up
from tests.acting import roles_file
from tests.recording_server import RecordingServer
from trainwire.producers import init

pytestmark = pytest.mark.kafka
SILENCE_SECONDS = 10  # short, yet long enough on a busy machine for two runs to log their NaN within it


def env_for(settings, server_url: str) -> dict[str, str]:
    alerting = {"sinks": [{"kind": "webhook", "url": f"{server_url}/hook"}], "silence_refresh_seconds": 0.5}
    roles_file(settings.home / "roles.toml")  # the test's one OS user silences as ops-alice and ops-bob
    return {**{k: v for k, v in os.environ.items() if not k.startswith("TRAINWIRE_")},
            "TRAINWIRE_HOME": str(settings.home), "TRAINWIRE_KAFKA": settings.kafka,
            "TRAINWIRE_TOPIC_PREFIX": settings.topic_prefix, "TRAINWIRE_ALERTING": json.dumps(alerting)}


def cli(env: dict[str, str], *args: str, expect: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "trainwire", *args], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == expect, result.stderr[-3000:]
    return result


def cli_json(env: dict[str, str], *args: str):
    return json.loads(cli(env, *args, "--json").stdout)


def nan_run(settings, experiment: str) -> str:
    with init(experiment, team="nlp", settings=settings, sample_gpus=False) as run:
        for step in (1, 2, 3):
            run.log_step(step, loss=2.0 - step * 0.1, grad_norm=1.0, learning_rate=1e-4)
        run.log_step(4, loss=math.nan, grad_norm=1.0, learning_rate=1e-4)
    return run.run_id


def pages_for(server, run_id: str) -> list:
    return [r for r in list(server.received) if r.body.get("run_id") == run_id]


def wait_for_page(server, run_id: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not (found := pages_for(server, run_id)):
        assert time.monotonic() < deadline, f"no page for run {run_id}"
        time.sleep(0.1)
    return found[0]


def at(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def test_a_silence_holds_only_its_pages_ends_on_time_and_is_audited(kafka_settings):
    with RecordingServer() as server:
        env = env_for(kafka_settings, server.url)
        with running_up(kafka_settings.home, timeout=90, env=env):
            silence = cli_json(env, "alerts", "silence", "--experiment", "quiet", "--for", f"{SILENCE_SECONDS}s",
                               "--reason", "maintenance on node 7", "--actor", "ops-alice")
            assert silence["matchers"] == "experiment=quiet" and silence["status"] == "active"
            time.sleep(1.0)  # the alert consumer reads silences every 0.5 s here

            held = nan_run(kafka_settings, "quiet")
            paged = nan_run(kafka_settings, "loud")
            loud_page = wait_for_page(server, paged)
            assert loud_page.at < at(silence["ends_at"]), "the other experiment is paged during the silence"
            assert [s["silence_id"] for s in cli_json(env, "alerts", "silences")] == [silence["silence_id"]]
            assert pages_for(server, held) == [], "the silenced run is not paged while the silence lasts"

            released = wait_for_page(server, held, timeout=SILENCE_SECONDS + 15)
            assert released.at >= at(silence["ends_at"]), "paged once the silence ended, not before"
            assert released.at - at(silence["ends_at"]) < 5.0, "…and soon after: it still fires"
            after = nan_run(kafka_settings, "quiet")
            wait_for_page(server, after)

            assert cli_json(env, "alerts", "silences") == []
            [ended] = cli_json(env, "alerts", "silences", "--all")
            assert ended["status"] == "expired" and ended["silence_id"] == silence["silence_id"]

            other = cli_json(env, "alerts", "silence", "--run", paged, "--rule", "loss_spike", "--for", "1h",
                             "--reason", "known noisy", "--actor", "ops-bob")
            removed = cli_json(env, "alerts", "unsilence", other["silence_id"], "--actor", "ops-bob",
                               "--reason", "fixed")
            assert removed["status"] == "removed" and removed["removed_by"] == "ops-bob"
            status = cli_json(env, "alerts", "status")
            log = cli_json(env, "audit", "log")
            time.sleep(1.0)
            assert len(pages_for(server, held)) == 1 and len(pages_for(server, paged)) == 1

    [webhook] = [row for row in status["sinks"] if row["sink"] == "webhook"]
    assert webhook["delivered"] == 3
    changes = [(e["action"], json.loads(e["details"])["silence_id"]) for e in log
               if e["action"].startswith("alerts.silence")]
    assert changes == [("alerts.silence_created", silence["silence_id"]),
                       ("alerts.silence_expired", silence["silence_id"]),
                       ("alerts.silence_created", other["silence_id"]),
                       ("alerts.silence_removed", other["silence_id"])]
    expired = next(e for e in log if e["action"] == "alerts.silence_expired")
    assert at(expired["ts"]) >= at(silence["ends_at"]) and expired["actor"] == "trainwire-alerts"
    created = next(e for e in log if e["action"] == "alerts.silence_created")
    assert created["actor"] == "ops-alice" and json.loads(created["details"])["reason"] == "maintenance on node 7"
    assert next(e for e in log if e["action"] == "alerts.silence_removed")["run_id"] == paged


def test_without_up_the_cli_writes_silences_to_the_store_itself(tmp_path):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TRAINWIRE_")},
           "TRAINWIRE_HOME": str(tmp_path / "home")}
    tomorrow = (datetime.now(timezone.utc) + timedelta(days=1)).isoformat(timespec="minutes")
    roles_file(tmp_path / "home" / "roles.toml")
    created = cli_json(env, "alerts", "silence", "--host", "node-7", "--until", tomorrow, "--reason",
                       "node 7 drained", "--actor", "ops")
    human = cli(env, "alerts", "silences").stdout
    assert created["silence_id"] in human and "host=node-7" in human and "node 7 drained" in human
    assert [e["action"] for e in cli_json(env, "audit", "log")][:1] == ["alerts.silence_created"]


@pytest.mark.parametrize("arguments, complaint", [
    (["silence", "--for", "2h", "--reason", "r"], "needs at least one of --run, --experiment, --rule, --host"),
    (["silence", "--run", "r1", "--reason", "r"], "needs --for DURATION (e.g. 2h) or --until TIME"),
    (["silence", "--run", "r1", "--for", "2h", "--until", "2999-01-01", "--reason", "r"], "one of them"),
    (["silence", "--run", "r1", "--for", "soon", "--reason", "r"], "--for 'soon': expected a duration"),
    (["silence", "--run", "r1", "--for", "2h"], "needs --reason"),
    (["unsilence"], "needs the silence's ID"),
    (["silences", "--run", "r1"], "takes no matchers"),
])
def test_a_silence_asked_for_wrongly_is_refused_in_one_line(tmp_path, arguments, complaint):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TRAINWIRE_")},
           "TRAINWIRE_HOME": str(tmp_path / "home")}
    result = cli(env, "alerts", *arguments, expect=2)
    assert result.stderr.count("\n") == 1 and complaint in result.stderr
