"""`trainwire up` on the embedded defaults owns the store; the CLI's read commands still work beside it."""

import json
import os
import signal
import subprocess
import sys
import time

from trainwire.infra.config import Settings
from trainwire.producers import init
from trainwire.producers.session import close_all


def cli(home, *args, check=True):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TRAINWIRE_")}, "TRAINWIRE_HOME": str(home)}
    result = subprocess.run([sys.executable, "-m", "trainwire", *args], env=env, capture_output=True, text=True,
                            timeout=120)
    assert not check or result.returncode == 0, result.stderr[-3000:]
    return result


def test_read_commands_work_while_up_owns_the_store(tmp_path):
    home = tmp_path / "home"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TRAINWIRE_")}, "TRAINWIRE_HOME": str(home)}
    up = subprocess.Popen([sys.executable, "-m", "trainwire", "up", "--no-dashboard"], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (home / "up.json").exists():
            assert up.poll() is None, up.stderr.read()
            assert time.monotonic() < deadline, "trainwire up did not start"
            time.sleep(0.2)

        settings = Settings(home=home)
        with init("beside-up", "while-up-runs", settings=settings, sample_gpus=False) as run:
            for step in range(1, 21):
                run.log_step(step, loss=2.0 / step, learning_rate=1e-4)
        close_all()

        deadline, runs = time.monotonic() + 30, []
        while not runs and time.monotonic() < deadline:
            runs = [r for r in json.loads(cli(home, "runs", "--json").stdout) if r["run_id"] == run.run_id]
            time.sleep(0.5)
        assert runs and runs[0]["experiment"] == "beside-up"

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            summary = json.loads(cli(home, "run", run.run_id, "--json").stdout)
            if summary["status"] == "completed":
                break
            time.sleep(0.5)
        assert summary["run_id"] == run.run_id and summary["steps_logged"] == 20 and summary["last_step"] == 20
        assert summary["status"] == "completed" and abs(summary["final_loss"] - 0.1) < 1e-9

        missing = cli(home, "run", "no-such-run", check=False)
        assert missing.returncode == 2 and "no run no-such-run" in missing.stderr
    finally:
        up.send_signal(signal.SIGTERM)
        assert up.wait(60) == 0
    assert not (home / "up.json").exists()

    direct = json.loads(cli(home, "run", run.run_id, "--json").stdout)  # up is gone: the CLI opens the store
    assert direct == summary
