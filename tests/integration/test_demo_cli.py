"""The main job as a user runs it: `trainwire demo --headless --json`, on the local log and on the broker."""

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from trainwire.infra.store import connect_store
from trainwire.infra.store.read import StoreReader


def demo(home, *extra):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TRAINWIRE_")}, "TRAINWIRE_HOME": str(home)}
    result = subprocess.run(
        [sys.executable, "-m", "trainwire", "demo", "--headless", "--json", "--jobs", "4", "--steps", "200", *extra],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout), result.stderr


def check_report(report):
    assert report["events_stored"] == report["events_produced"] > 3 * 200 + 120  # the NaN job stops after step 120
    assert len(report["runs"]) == 4
    not_finite = [a for a in report["alerts"] if a["rule"] == "loss_not_finite"]
    assert len(not_finite) == 1 and not_finite[0]["severity"] == "block" and not_finite[0]["step"] == 120


def test_demo_on_embedded_defaults(tmp_path):
    report, stderr = demo(tmp_path, "--inject", "nan")
    check_report(report)
    assert report["store"] == f"chdb://{tmp_path.resolve()}/chdb"
    assert f"ALERT [BLOCK] loss_not_finite on run {report['runs'][0]} (demo-sft) at step 120" in stderr  # paged
    assert "all 4 jobs finished (1 stopped by trainwire)" in stderr


@pytest.mark.kafka
def test_demo_through_kafka(tmp_path, kafka_bootstrap):
    report, _ = demo(tmp_path, "--inject", "nan", "--kafka", kafka_bootstrap)
    check_report(report)
    assert report["transport"] == f"kafka://{kafka_bootstrap}"


def test_every_fault_hits_its_own_job(tmp_path):
    report, _ = demo(tmp_path, "--inject", "nan,spike,gradnorm")
    check_report(report)
    rules = {(a["rule"], a["run_id"]) for a in report["alerts"]}
    by_rule = {}
    for rule, run_id in rules:
        by_rule.setdefault(rule, set()).add(run_id)
    assert by_rule["loss_spike"] == {report["runs"][1]}
    assert by_rule["grad_norm_high"] >= {report["runs"][2]}
    assert report["runs"][3] not in set().union(*by_rule.values())


def test_unknown_fault_is_a_clear_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "trainwire", "demo", "--headless", "--inject", "meltdown"],
                            env={**os.environ, "TRAINWIRE_HOME": str(tmp_path)}, capture_output=True, text=True)
    assert result.returncode == 2
    assert "unknown fault meltdown" in result.stderr


def stored(home, read):
    """`read(StoreReader)` on the demo's embedded store, from this test process (one chdb path at a time)."""
    client = connect_store(f"chdb://{home}/chdb")
    try:
        return read(StoreReader(client))
    finally:
        client.close()


def test_the_nan_job_is_stopped_by_trainwire_after_a_final_checkpoint(tmp_path):
    report, stderr = demo(tmp_path, "--inject", "nan")
    nan_run = report["runs"][0]
    summary, checkpoints = stored(tmp_path, lambda store: (store.run_summary(nan_run), store.checkpoints(nan_run)))
    assert summary["status"] == "stopped" and summary["error"].startswith("loss_not_finite: train loss is nan")
    assert 120 < summary["last_step"] < 200, "stopped on its way, after the NaN at step 120"
    final = checkpoints[-1]
    assert final["step"] == summary["last_step"] and final["path"].endswith(f"checkpoint-{final['step']}")
    assert final["ts"] <= summary["ended_at"] and final["files"], "a final checkpoint, stored before the run ended"
    assert f"stopped by trainwire at step {final['step']}" in stderr
    assert report["stopped"] == [{"run_id": nan_run, "run_name": summary["run_name"], "step": final["step"],
                                  "reason": summary["error"]}]
    assert all(stored_run["status"] == "completed" for stored_run in stored(tmp_path, StoreReader.runs)
               if stored_run["run_id"] != nan_run), "only the run that opted in and hit NaN is stopped"


def test_two_demos_in_one_home_give_runs_distinct_names(tmp_path):
    first, _ = demo(tmp_path, "--jobs", "2", "--steps", "5")
    second, _ = demo(tmp_path, "--jobs", "2", "--steps", "5")
    names = {run["run_id"]: run["run_name"] for run in stored(tmp_path, StoreReader.runs)}
    assert set(names) == set(first["runs"] + second["runs"])
    assert len(set(names.values())) == 4, names
    assert all(name.startswith(("job-0", "job-1")) for name in names.values()), "still says which job it was"


def test_with_the_dashboard_it_says_when_every_job_has_finished_and_where_to_look(tmp_path):
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TRAINWIRE_")}, "TRAINWIRE_HOME": str(tmp_path)}
    demo_process = subprocess.Popen(
        [sys.executable, "-m", "trainwire", "demo", "--jobs", "2", "--steps", "20", "--step-seconds", "0.01",
         "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in demo_process.stderr], daemon=True).start()
    try:
        announced, seen = "", []
        deadline = time.monotonic() + 120
        while "finished" not in announced and time.monotonic() < deadline:
            try:
                seen.append(lines.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
            announced = seen[-1]
        assert "all 2 jobs finished" in announced, seen
        assert f"http://localhost:{port}" in announced and "until Ctrl-C" in announced, announced
        assert dashboard_answers(port), "and the dashboard serves on"
        demo_process.send_signal(signal.SIGINT)
        assert demo_process.wait(timeout=120) == 0, "Ctrl-C ends it, every event stored"
    finally:
        demo_process.kill()
        demo_process.stderr.close()


def dashboard_answers(port: int, within: float = 60.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=5) as health:
                return health.status == 200
        except OSError:  # not listening yet
            time.sleep(0.5)
    return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
