"""The home the CLI tests read: three ended runs through a real local log, real ingest and embedded ClickHouse. One
diverged to NaN (its loss alert firing, its gates blocked); two are named "twin" and their ids share the prefix 7c0f."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from trainwire.cli import main
from trainwire.consumers.service import build_ingest
from trainwire.infra.config import Settings
from trainwire.producers import init
from trainwire.producers.session import close_all
from trainwire.producers.simulate import JobPlan, run_job

DIVERGED = "5e1f0a2b-0000-4000-8000-000000000001"
TWIN_A = "7c0ffee1-0000-4000-8000-00000000000a"
TWIN_B = "7c0ffee2-0000-4000-8000-00000000000b"


@contextmanager
def three_runs_home(root: Path, steps: int,
                    before_ingest: Callable[[Settings], None] = lambda settings: None) -> Iterator[Settings]:
    """The home's settings, with TRAINWIRE_HOME pointing at it while the caller uses it; `before_ingest` may add
    records for ingest to meet."""
    settings = Settings(home=root / "home", batch_max_seconds=0.2)
    with pytest.MonkeyPatch.context() as env:
        for key in [k for k in os.environ if k.startswith("TRAINWIRE_")]:
            env.delenv(key)
        env.setenv("TRAINWIRE_HOME", str(settings.home))
        for run_id, name, fault in ((DIVERGED, "diverged", "nan"), (TWIN_A, "twin", None), (TWIN_B, "twin", None)):
            run = init("cli-sft", name, {"learning_rate": 2e-4}, settings=settings, sample_gpus=False, run_id=run_id,
                       total_steps=steps)
            run_job(run, JobPlan(steps=steps, fault=fault, seed=1))
            run.finish("completed")
        close_all()
        before_ingest(settings)
        pipeline = build_ingest(settings, on_alert=lambda alert: None)
        pipeline.drain(idle_seconds=1.0)
        pipeline.close()
        yield settings


def cli(capsys, *args) -> tuple[int, str, str]:
    """`trainwire ARGS…` in this process: its exit code, stdout and stderr."""
    code = main([*args])
    out, err = capsys.readouterr()
    return code, out, err
