"""README command 1 as a new user meets it, on a copy of this working tree: `bash infra/setup` installs the pipeline,
the CLI and the dashboard without any trainer library (torch, transformers, peft: gigabytes and minutes), prints
only its own few lines, and what it installed runs the demo and draws the dashboard."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.install
TRAINER_LIBRARIES = ("torch", "transformers", "peft")


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """The files git tracks or would track, copied as a clone would have them, then `bash infra/setup` there."""
    root = tmp_path_factory.mktemp("checkout")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, map(os.fsdecode, listed)):
        if (ROOT / name).is_file():  # a tracked file deleted in the working tree is listed too
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, root / name)
    setup = subprocess.run(["bash", "infra/setup"], cwd=root, capture_output=True, text=True, timeout=900)
    assert setup.returncode == 0, setup.stdout + setup.stderr
    return root, setup


def in_light_venv(root: Path, *args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRAINWIRE_HOME": str(home)}
    return subprocess.run([str(root / ".venv/bin/python"), *args], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)


def test_set_up_prints_only_its_own_lines(checkout):
    _, setup = checkout
    lines = (setup.stdout + setup.stderr).splitlines()
    assert lines and all(line.startswith("infra/setup: ") for line in lines), "\n".join(lines)


def test_the_light_install_has_no_trainer_library(checkout, tmp_path):
    root, _ = checkout
    found = in_light_venv(root, "-c", f"import importlib.util; print([m for m in {TRAINER_LIBRARIES!r} "
                                      "if importlib.util.find_spec(m)])", home=tmp_path)
    assert found.returncode == 0 and found.stdout.strip() == "[]", found.stdout + found.stderr


def test_the_demo_runs_and_the_dashboard_draws_on_the_light_install(checkout, tmp_path):
    root, _ = checkout
    demo = in_light_venv(root, "-m", "trainwire", "demo", "--headless", "--json", "--jobs", "2", "--steps", "40",
                         "--inject", "nan", home=tmp_path)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "loss_not_finite" in {alert["rule"] for alert in json.loads(demo.stdout)["alerts"]}

    drawn = in_light_venv(root, "-c", "import sys; from streamlit.testing.v1 import AppTest; "
                                      "app = AppTest.from_file('dashboard/app.py', default_timeout=120).run(); "
                                      "print([e.message for e in app.exception]); "
                                      f"print(sorted(set(sys.modules) & set({TRAINER_LIBRARIES!r})))", home=tmp_path)
    assert drawn.returncode == 0 and drawn.stdout.splitlines()[-2:] == ["[]", "[]"], drawn.stdout + drawn.stderr
