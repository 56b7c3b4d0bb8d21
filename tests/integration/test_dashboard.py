"""The dashboard on a store the demo filled: in Streamlit's AppTest, in a real Chromium, and live while a job runs."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "dashboard" / "app.py"
ARTIFACTS = ROOT / "test-artifacts"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LAST_STEP = re.compile(r"last step (\d+)")


def trainwire_env(home: Path) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("TRAINWIRE_")}, "TRAINWIRE_HOME": str(home)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Two finished demo jobs, one diverging to NaN, in a private home; the demo process has exited."""
    home = tmp_path_factory.mktemp("dashboard-demo")
    result = subprocess.run(
        [sys.executable, "-m", "trainwire", "demo", "--headless", "--jobs", "2", "--steps", "60", "--inject", "nan",
         "--json"],
        env=trainwire_env(home), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return home, json.loads(result.stdout)


def nan_run(report: dict) -> str:
    return next(a["run_id"] for a in report["alerts"] if a["rule"] == "loss_not_finite")


@pytest.fixture
def app_test(monkeypatch: pytest.MonkeyPatch) -> Iterator:
    """AppTest on a given store; afterwards the cached client is released, so other processes can open the store."""
    for name in [k for k in os.environ if k.startswith("TRAINWIRE_")]:
        monkeypatch.delenv(name)

    def start(store_dsn: str) -> AppTest:
        monkeypatch.setenv("TRAINWIRE_STORE", store_dsn)
        return AppTest.from_file(str(APP), default_timeout=60).run()

    yield start
    st.cache_resource.clear()


def test_app_lists_runs_and_shows_the_nan_alert(app_test, demo):
    home, report = demo
    at = app_test(f"chdb://{home}/chdb")
    assert not at.exception
    picker = at.selectbox(key="run")
    assert sorted(label.rsplit(" · ", 1)[1] for label in picker.options) == sorted(r[:8] for r in report["runs"])

    at = picker.select(nan_run(report)).run()
    assert not at.exception
    rules = {rule for frame in at.dataframe for rule in frame.value["rule"]}
    assert "loss_not_finite" in rules
    assert any("last step 60 of 60" in md.value and "firing alert" in md.value for md in at.markdown)


def test_app_on_an_empty_store_says_so(app_test, tmp_path):
    at = app_test(f"chdb://{tmp_path}/chdb")
    assert not at.exception
    assert any("No runs yet" in info.value for info in at.info)


@pytest.fixture
def chromium() -> str:
    path = os.environ.get("TRAINWIRE_CHROMIUM", "/usr/bin/chromium")
    if not Path(path).is_file():
        reason = f"no Chromium at {path} (set TRAINWIRE_CHROMIUM, or apt-get install chromium)"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    return path


@pytest.fixture
def browser(chromium: str) -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def wait_http_ok(url: str, process: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"no HTTP 200 from {url} in {timeout}s:\n{log.read_text()[-3000:]}"
        time.sleep(0.3)


@contextmanager
def serving(home: Path, *args: str) -> Iterator[str]:
    """Run `python -m trainwire ARGS --port P` on HOME until the block ends; yields the page's URL."""
    port = free_port()
    log = home / f"server-{port}.log"
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "trainwire", *args, "--port", str(port)],
                                   env=trainwire_env(home), stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_http_ok(url, process, log)
        wait_http_ok(f"{url}_stcore/health", process, log)
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def status_text(page) -> str:
    line = page.get_by_text(LAST_STEP)
    line.wait_for(timeout=30_000)
    return line.inner_text()


def test_dashboard_in_a_browser(demo, browser):
    home, report = demo
    with serving(home, "dashboard") as url:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        page.get_by_role("heading", name="trainwire").wait_for(timeout=30_000)
        page.locator('[data-testid="stVegaLiteChart"]').first.wait_for(timeout=30_000)
        page.locator('[data-testid="stVegaLiteChart"] canvas, [data-testid="stVegaLiteChart"] svg').first.wait_for(
            timeout=30_000)
        assert "last step 60 of 60" in status_text(page)

        page.locator('[data-testid="stSidebar"] [data-testid="stSelectbox"]').click()
        page.get_by_role("option", name=re.compile(nan_run(report)[:8])).click()
        page.get_by_text(re.compile(r"[1-9]\d* firing alerts?")).wait_for(timeout=30_000)
        page.locator('[data-testid="stDataFrame"]').wait_for(timeout=30_000)
        page.wait_for_timeout(2_500)
        assert page.get_by_text(nan_run(report)).is_visible(), "the selection did not survive a refresh"

        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        assert page.locator('[data-testid="stException"]').count() == 0
        assert page.locator('[data-testid="stVegaLiteChart"]').count() >= 3


def test_dashboard_refreshes_while_a_job_runs(tmp_path_factory, browser):
    home = tmp_path_factory.mktemp("dashboard-live")
    with serving(home, "demo", "--jobs", "1", "--steps", "400", "--step-seconds", "0.1") as url:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        page.evaluate("window.trainwireLoaded = true")
        deadline = time.monotonic() + 30
        while int(LAST_STEP.search(status_text(page))[1]) == 0 and time.monotonic() < deadline:
            page.wait_for_timeout(500)
        before = int(LAST_STEP.search(status_text(page))[1])
        page.wait_for_timeout(5_000)
        after = int(LAST_STEP.search(status_text(page))[1])
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard-live.png"), full_page=True)

        assert after > before > 0
        assert page.evaluate("window.trainwireLoaded === true"), "the page was reloaded"
        assert page.locator('[data-testid="stException"]').count() == 0
