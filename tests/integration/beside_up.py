"""Run `trainwire up` (embedded defaults, no dashboard) in a private home, and the CLI beside it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path


def cli_env(home: Path) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("TRAINWIRE_")}, "TRAINWIRE_HOME": str(home)}


def cli(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "trainwire", *args], env=cli_env(home), capture_output=True,
                            text=True, timeout=120)
    assert not check or result.returncode == 0, result.stderr[-3000:]
    return result


@contextlib.contextmanager
def running_up(home: Path, timeout: float = 60, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """`trainwire up` until the block ends; it must then stop cleanly on SIGTERM. `env`: instead of cli_env(home)."""
    up = subprocess.Popen([sys.executable, "-m", "trainwire", "up", "--no-dashboard"], env=env or cli_env(home),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout
        while not (home / "up.json").exists():
            assert up.poll() is None, up.stderr.read()
            assert time.monotonic() < deadline, "trainwire up did not start"
            time.sleep(0.2)
        yield up
    finally:
        up.send_signal(signal.SIGTERM)
        assert up.wait(60) == 0, up.stderr.read()[-3000:]
