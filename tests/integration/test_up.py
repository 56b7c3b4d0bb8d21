"""`trainwire up` on the embedded defaults owns the store; the CLI's read commands still work beside it."""

import json
import time

from beside_up import cli, running_up

from trainwire.infra.config import Settings
from trainwire.producers import init
from trainwire.producers.session import close_all


def test_read_commands_work_while_up_owns_the_store(tmp_path):
    home = tmp_path / "home"
    with running_up(home):
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
        assert missing.returncode == 6 and "no run 'no-such-run'" in missing.stderr  # exit 6: RUN names no run
    assert not (home / "up.json").exists()

    direct = json.loads(cli(home, "run", run.run_id, "--json").stdout)  # up is gone: the CLI opens the store
    assert direct == summary
