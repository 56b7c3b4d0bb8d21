"""The dashboard on a store the demo filled: every view in Streamlit's AppTest and in a real Chromium, and live
while a run logs steps into `trainwire up`."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from trainwire.consumers.governance import Governance
from trainwire.dashboard.audit_data import GOVERNANCE_READS, audit_export
from trainwire.infra.config import Settings
from trainwire.infra.store import connect_store, migrate
from trainwire.infra.store.api import ReadApiServer, RemoteReader, to_json
from trainwire.infra.store.governance import GovernanceReads
from trainwire.infra.store.read import StoreReader

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "dashboard" / "app.py"
ARTIFACTS = ROOT / "test-artifacts"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STEPS = 60
NAN_FROM = 36  # the demo's "nan" job logs NaN losses from 60% of its steps on, until the stop switch stops it
VIEWS = {"training": "Training", "fleet": "Fleet", "compare": "Experiment comparison", "resources": "Resources",
         "alerts": "Alerts", "audit": "Audit"}
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
        [sys.executable, "-m", "trainwire", "demo", "--headless", "--jobs", "2", "--steps", str(STEPS),
         "--inject", "nan", "--json"],
        env=trainwire_env(home), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return home, json.loads(result.stdout)


def nan_run(report: dict) -> str:
    return next(a["run_id"] for a in report["alerts"] if a["rule"] == "loss_not_finite")


def stopped_at(report: dict) -> int:
    """The last step of the NaN run: the demo's NaN job opts into the stop switch, which stops it after the NaN."""
    (stopped,) = report["stopped"]
    return stopped["step"]


# --- The read API behind the views -------------------------------------------------------------------------------------

def test_long_curves_come_downsampled_from_the_rollup_with_nans_kept(tmp_path):
    """20,000 steps with one NaN: at most max_points points, read from steps_100, agreeing with the raw rows
    (mean of the finite losses per point, NaNs counted apart)."""
    client = connect_store(f"chdb://{tmp_path}/chdb")
    try:
        migrate(client)
        client.command(
            "INSERT INTO steps (event_id, run_id, experiment, team, host, seq, ts, step, loss, learning_rate) "
            "SELECT toString(number), 'r1', 'e', '', 'h', number, toDateTime64(now() - 86400, 3, 'UTC') + number, "
            "number + 1, if(number + 1 = 12345, nan, 1 + (number % 7) / 10), 1e-4 FROM numbers(20000)")
        store = StoreReader(client)
        # the rollup holds 100-step rows (steps 0–99, 100–199, …); 201 of them make 67 points of 3 rows each
        raw = client.query("SELECT max(step), avgIf(loss, isFinite(loss)), countIf(NOT isFinite(loss)) FROM steps "
                           "GROUP BY intDiv(step, 300) ORDER BY 1").result_rows
        client.command("TRUNCATE TABLE steps")  # what is left to read is the rollup
        curve = store.curve("r1", max_points=100)
    finally:
        client.close()
    assert len(curve) == 67 and sum(point["steps"] for point in curve) == 20000
    assert [(p["step"], round(p["loss"], 9), p["loss_not_finite"]) for p in curve] == [
        (last, round(mean, 9), bad) for last, mean, bad in raw]
    assert [p["step"] for p in curve if p["loss_not_finite"]] == [12599], "the NaN's bucket is marked"


def test_view_reads_answer_over_the_loopback_read_api(demo):
    home, report = demo
    store = StoreReader(connect_store(f"chdb://{home}/chdb"))
    api = ReadApiServer(store, home).start()
    try:
        remote, bad = RemoteReader(api.url, home), nan_run(report)
        since = datetime.now(timezone.utc) - timedelta(days=1)
        assert remote.curve(run_id=bad, since=since, max_points=20) == to_json(store.curve(bad, since, None, 20))
        whole = remote.curve(run_id=bad, max_points=20)
        assert 10 <= len(whole) <= 20 and whole[-1]["step"] == stopped_at(report), "downsampled, to the last step"
        compared = remote.compare(run_ids=report["runs"])
        assert [r["run_id"] for r in compared["runs"]] == report["runs"]
        assert compared["differing"] == ["data_seed", "job", "numpy_seed", "seed"], "the demo's jobs differ in seeds"
        blocked = remote.alert_incidents(run_ids=report["runs"], severities=["block"], since=since)
        assert [(i["run_id"], i["rule"]) for i in blocked] == [(bad, "loss_not_finite")]
        assert {r["run_id"] for r in remote.fleet(since=since)} == set(report["runs"])
        assert {g["gpu_index"] for g in remote.gpu_series(run_id=bad)} == {0, 1}
    finally:
        api.stop()
        store._client.close()


# --- AppTest ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def app_test(monkeypatch: pytest.MonkeyPatch) -> Iterator:
    """AppTest on a given store; afterwards the cached client is released, so other processes can open the store."""
    for name in [k for k in os.environ if k.startswith("TRAINWIRE_")]:
        monkeypatch.delenv(name)

    def start(store_dsn: str) -> AppTest:
        monkeypatch.setenv("TRAINWIRE_STORE", store_dsn)
        # the store's home, not the user's: the dashboard writes audit entries with that home's settings
        monkeypatch.setenv("TRAINWIRE_HOME", str(Path(store_dsn.removeprefix("chdb://")).parent))
        return AppTest.from_file(str(APP), default_timeout=60).run()

    yield start
    st.cache_resource.clear()


def view(at: AppTest, name: str) -> AppTest:
    at.switch_page(f"views/{name}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.title[0].value == VIEWS[name]
    return at


def chart(at: AppTest, y_title: str) -> dict[str, pd.DataFrame]:
    """The layers of the chart whose y axis is titled `y_title`, as sent to the browser: mark type → its data."""
    for element in at.get("vega_lite_chart"):
        spec = json.loads(element.proto.spec)
        layers = spec.get("layer") or [spec]
        if any(layer["encoding"].get("y", {}).get("title") == y_title for layer in layers):
            frames = {d.name: pa.ipc.open_stream(d.data.data).read_pandas() for d in element.proto.datasets}
            data = [(layer.get("data") or spec.get("data") or {}).get("name") for layer in layers]
            return {layer["mark"].get("shape") or layer["mark"]["type"]: frames.get(name, next(iter(frames.values())))
                    for layer, name in reversed(list(zip(layers, data)))}
    raise AssertionError(f"no chart of {y_title!r}")


def text(at: AppTest) -> str:
    return "\n".join([m.value for m in at.markdown] + [c.value for c in at.caption] + [i.value for i in at.info])


def test_every_view_shows_the_demo_runs(app_test, demo):
    home, report = demo
    at = app_test(f"chdb://{home}/chdb")
    assert not at.exception
    picker = at.selectbox(key="run")
    assert sorted(label.rsplit(" · ", 1)[1] for label in picker.options) == sorted(r[:8] for r in report["runs"])
    bad = nan_run(report)
    at = picker.select(bad).run()

    at = view(at, "training")
    assert f"last step {stopped_at(report)} of {STEPS}" in text(at) and "2 firing alerts" in text(at)
    loss = chart(at, "loss")
    assert list(loss["line"]["step"]) == list(range(1, NAN_FROM)), "a point per finite step"
    assert list(loss["cross"]["step"]) == list(range(NAN_FROM, stopped_at(report) + 1)), "a NaN marker per NaN step"
    assert set(loss["rule"]["rule"]) == {"loss_not_finite", "grad_norm_high"}, "alerts marked on the curve"
    assert {"loss_not_finite", "grad_norm_high"} <= {rule for frame in at.dataframe for rule in frame.value["rule"]}
    assert len(chart(at, "learning rate")["line"]) == len(chart(at, "tokens/s")["line"]) == stopped_at(report)

    at = view(at, "fleet")
    fleet = at.dataframe[0].value.set_index("run id")
    assert set(fleet.index) == set(report["runs"])
    assert fleet.index[0] == bad and fleet.loc[bad, "firing"] == 2 and fleet.loc[bad, "loss"] == "NaN"
    assert fleet.loc[bad, "gates"] == "blocked" and fleet.drop(index=bad)["status"].eq("completed").all()
    assert fleet.loc[bad, "status"] == "stopped", "stopped by the stop switch"

    at = view(at, "compare")
    at.multiselect(key="compare-runs").set_value(report["runs"]).run()
    assert not at.exception
    assert {tuple(sorted(frame.value.columns)) for frame in at.dataframe} == {
        tuple(sorted(picker.format_func(r) + (" · ⚠ NaN loss" if r == bad else "") for r in report["runs"]))}
    assert "4 of 8 parameters differ: data_seed, job, numpy_seed, seed" in text(at)
    assert set(chart(at, "loss")["line"]["run_id"]) == set(report["runs"])

    at = view(at, "resources")
    assert at.metric[0].label == "GPUs" and at.metric[0].value == "2"  # the demo's two simulated GPUs
    assert len(chart(at, "utilisation %")["line"]["gpu"].unique()) == 2

    at = view(at, "alerts")
    assert at.metric[0].value == str(len(report["alerts"]))
    at.multiselect(key="alerts-severities").set_value(["block"]).run()
    assert set(at.dataframe[0].value["rule"]) == {"loss_not_finite"}

    at = view(at, "audit")
    assert at.get("download_button")[0].label == "Download audit JSON"
    assert "**blocked**" in text(at), "G1 blocks a run whose loss went NaN"
    assert "Registry stage: None (no transitions; gates blocked)" in text(at)
    assert at.selectbox(key="run").value == bad, "the chosen run survived six page changes"


def test_time_ranges_follow_the_data_and_persist_across_views(app_test, demo):
    home, report = demo
    at = view(app_test(f"chdb://{home}/chdb"), "training")
    at.button_group(key="range").set_value("15m").run()
    assert "last 15 min" in text(at) and len(chart(at, "learning rate")["line"]) == stopped_at(report), \
        "the demo just ran"

    at.button_group(key="range").set_value("custom").run()
    yesterday = datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(days=1)
    dates = {d.key: d for d in at.get("date_time_input")}
    dates["range_from"].set_value(yesterday - timedelta(hours=1))
    dates["range_to"].set_value(yesterday).run()
    assert "no steps logged in this time range" in text(at)
    at = view(at, "alerts")
    assert at.metric[0].value == "0", "no incident was active a day before the demo"
    assert at.button_group(key="range").value == "custom"
    at.button_group(key="range").set_value("all").run()
    assert at.metric[0].value == str(len(report["alerts"]))


def test_audit_export_holds_lineage_hashes_and_the_audit_record(demo):
    home, report = demo
    store = StoreReader(connect_store(f"chdb://{home}/chdb"))
    try:
        exported = json.loads(json.dumps(audit_export(store, nan_run(report))))
    finally:
        store._client.close()
    assert exported["run_id"] == nan_run(report)
    assert exported["lineage"]["dataset_sha256"].startswith("sha256:")
    assert exported["lineage"]["base_model_sha256"].startswith("sha256:")
    assert exported["checkpoints"] == [] or all(f["sha256"].startswith("sha256:")
                                                 for c in exported["checkpoints"] for f in c["files"])
    assert all(f["sha256"].startswith("sha256:") for f in exported["run_ended"]["artifacts"])
    assert exported["audit_record"]["run_id"] == nan_run(report)
    assert exported["gates"]["overall"] == "blocked"  # G1: the loss went NaN


def test_audit_without_governance_says_not_evaluated_yet(app_test, demo, monkeypatch):
    home, report = demo
    for method in GOVERNANCE_READS.values():  # a reader from before governance existed
        monkeypatch.delattr(GovernanceReads, method)
    at = app_test(f"chdb://{home}/chdb")
    at = view(at, "audit")
    assert "Quality gates: not evaluated yet" in text(at) and "Audit record: not evaluated yet" in text(at)
    assert "Registry stage: None (not evaluated yet)" in text(at)
    assert "sha256:" in "".join(str(frame.value.to_dict()) for frame in at.dataframe)


def audit_log_after(dsn: str, seq: int) -> list[dict]:
    client = connect_store(dsn)
    try:
        return [e for e in StoreReader(client).audit_log() if e["seq"] > seq]
    finally:
        client.close()


def test_each_sessions_first_view_of_a_page_and_run_goes_to_the_audit_log(app_test, demo):
    home, report = demo
    dsn = f"chdb://{home}/chdb"
    before = max((e["seq"] for e in audit_log_after(dsn, -1)), default=-1)
    bad = nan_run(report)
    at = app_test(dsn)
    at = at.selectbox(key="run").select(bad).run()
    for name in ("audit", "fleet", "audit"):  # a page seen again in the session, and live refreshes, log nothing
        at = view(at, name)
        at.run()
    st.cache_resource.clear()  # let go of the store
    viewed = [(e["actor"], e["run_id"], json.loads(e["details"])["page"]) for e in audit_log_after(dsn, before)]
    client = connect_store(dsn)
    try:
        verified = Governance(client).verify(actor="test")
    finally:
        client.close()
    assert viewed == [("anonymous", "", "Fleet"), ("anonymous", bad, "Audit")], "the dashboard opens on the Fleet"
    assert verified["ok"], verified["problems"]


def test_every_view_on_an_empty_store_says_so(app_test, tmp_path):
    at = app_test(f"chdb://{tmp_path}/chdb")
    assert not at.exception
    for name in VIEWS:
        at = view(at, name)
        if name != "compare":
            assert any("No runs yet" in info.value for info in at.info), name


# --- A real browser ------------------------------------------------------------------------------------------------

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
def serving(home: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """Run `python -m trainwire ARGS --port P` on HOME (with settings `env`) until the block ends; yields the
    page's URL."""
    port = free_port()
    log = home / f"server-{port}.log"
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "trainwire", *args, "--port", str(port)],
                                   env={**trainwire_env(home), **(env or {})}, stdout=out, stderr=subprocess.STDOUT)
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


def points(page, chart: str = "loss") -> list[int]:
    """The steps of the value points the browser drew in a chart (SVG, each point with its ARIA label), NaN
    markers left out."""
    labels = page.locator(f'.st-key-chart-{chart} [aria-roledescription="point"]').evaluate_all(
        "marks => marks.map(m => m.getAttribute('aria-label'))")
    return sorted(int(m[1]) for label in labels
                  if "NaN/Inf" not in (label or "") and (m := re.match(r"step: (\d+);", label or "")))


def sidebar_run(page) -> str:
    picker = page.locator('[data-testid="stSidebar"] [data-testid="stSelectbox"]')
    return picker.text_content() + " ".join(i.input_value() for i in picker.locator("input").all())


def no_exception(page) -> None:
    assert page.locator('[data-testid="stException"]').count() == 0, page.locator(
        '[data-testid="stException"]').first.inner_text()


def test_every_view_in_a_browser(demo, browser):
    home, report = demo
    bad = nan_run(report)
    ARTIFACTS.mkdir(exist_ok=True)
    proxied = {"TRAINWIRE_DASHBOARD_AUTH": "proxy", "TRAINWIRE_DASHBOARD_TRUSTED_PROXIES": "127.0.0.1"}
    with serving(home, "dashboard", env=proxied) as url:
        page = browser.new_page(viewport={"width": 1400, "height": 1000},
                                extra_http_headers={"X-Forwarded-User": "auditor@example.com"})  # as a proxy sets
        page.goto(f"{url}training?run={bad}")  # a shared link picks the page and the run
        page.get_by_role("heading", name="Training", exact=True).wait_for(timeout=30_000)
        page.get_by_text(f"last step {stopped_at(report)} of {STEPS}").wait_for(timeout=30_000)
        page.locator('.st-key-chart-loss [aria-roledescription="point"]').first.wait_for(timeout=30_000)
        assert points(page) == list(range(1, NAN_FROM)), "the loss chart draws the run's finite steps"
        assert page.locator('.st-key-chart-loss [aria-roledescription="point"][aria-label*="NaN/Inf"]').count() \
            == stopped_at(report) - NAN_FROM + 1, "and marks each NaN step"
        page.wait_for_timeout(2_500)  # a live refresh or two
        assert points(page) == list(range(1, NAN_FROM))
        no_exception(page)
        page.screenshot(path=str(ARTIFACTS / "dashboard-training.png"), full_page=True)

        for name, title in list(VIEWS.items())[1:]:
            page.locator('[data-testid="stSidebarNav"]').get_by_role("link", name=title).click()
            page.get_by_role("heading", name=title, exact=True).wait_for(timeout=30_000)
            page.wait_for_load_state("networkidle")
            page.wait_for_timeout(1_500)
            no_exception(page)
            assert bad[:8] in sidebar_run(page), f"the chosen run was lost on {title}"
            assert f"run={bad}" in page.url
            page.screenshot(path=str(ARTIFACTS / f"dashboard-{name}.png"), full_page=True)
        with page.expect_download() as download:
            page.get_by_role("button", name="Download audit JSON").click()
        exported = json.loads(Path(download.value.path()).read_text())
        assert exported["run_id"] == bad and exported["lineage"]["dataset_sha256"].startswith("sha256:")
    log = [e for e in audit_log_after(f"chdb://{home}/chdb", -1) if e["actor"] == "auditor@example.com"]
    assert {(e["actor"], e["action"]) for e in log} == {("auditor@example.com", "dashboard.login"),
                                                         ("auditor@example.com", "dashboard.viewed"),
                                                         ("auditor@example.com", "dashboard.audit_downloaded")}
    assert {(json.loads(e["details"]).get("page"), e["run_id"]) for e in log} == {
        ("Training", bad), ("Fleet", ""), ("Experiment comparison", ""), ("Resources", bad), ("Alerts", ""),
        ("Audit", bad), (None, bad), (None, "")}  # the last two: the download and the login


def test_new_steps_appear_live_without_a_reload(tmp_path, browser):
    """`trainwire up` (ingest, read API and dashboard in one process) while this test trains: each step logged
    appears as a point on the open Training page, which is never reloaded."""
    from trainwire import init

    home = tmp_path / "home"
    home.mkdir()
    settings = Settings(home=home, gpu_sample_seconds=1.0, heartbeat_seconds=1.0)
    steps, latencies = 12, []
    with serving(home, "up") as url:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{url}training")
        page.get_by_text("No runs yet").wait_for(timeout=30_000)
        page.evaluate("window.trainwireLoaded = true")
        with init("live-test", "live", {"learning_rate": 1e-4}, settings=settings, total_steps=steps,
                  sample_gpus=False) as run:
            page.get_by_text(f"last step 0 of {steps}").wait_for(timeout=30_000)  # a new run redraws the page
            for step in range(1, steps + 1):
                logged = time.monotonic()
                run.log_step(step, loss=2.0 / math.sqrt(step), learning_rate=1e-4, grad_norm=1.0, tokens_per_s=900.0)
                page.locator(f'.st-key-chart-loss [aria-roledescription="point"][aria-label^="step: {step};"]'
                             ).wait_for(timeout=15_000)
                latencies.append(time.monotonic() - logged)
            assert points(page) == list(range(1, steps + 1))
            page.get_by_text(f"last step {steps} of {steps}").wait_for(timeout=15_000)
            no_exception(page)
            assert page.evaluate("window.trainwireLoaded === true"), "the page was reloaded"
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard-live.png"), full_page=True)
    (ARTIFACTS / "dashboard-live-latency.json").write_text(json.dumps(
        {"seconds_from_log_step_to_point": [round(s, 3) for s in latencies],
         "median": round(statistics.median(latencies), 3), "max": round(max(latencies), 3)}, indent=2))


# --- Paging: flapping, storms and silences (issue 14) ------------------------------------------------------------

ALERT_COLUMNS = ["event_id", "run_id", "experiment", "team", "ts", "rule", "severity", "state", "step", "value",
                 "threshold", "message", "dedup_key"]


def alert_row(run_id: str, rule: str, step: int, state: str, ts: datetime, severity: str = "critical") -> list:
    return [f"{run_id}/{rule}/{step}/{state}", run_id, "paging", "nlp", ts, rule, severity, state, step, 1.0, 0.5,
            f"{rule} {state} at step {step}", f"{run_id}/{rule}/{step}"]


@pytest.fixture(scope="module")
def paging_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, str]]:
    """Five runs stored through ingest; one run's loss_spike flapping (five incidents a minute apart), a storm of
    loss_not_finite over three runs within two seconds, one run silenced and a silence that already ended."""
    from trainwire import init
    from trainwire.consumers.service import build_ingest
    from trainwire.infra.store.silences import COLUMNS, Silence, SilenceBook

    home = tmp_path_factory.mktemp("paging-dashboard")
    settings = Settings(home=home, batch_max_seconds=0.2)
    runs = {}
    for name in ("flappy", "storm-a", "storm-b", "storm-c", "quiet"):
        with init("paging", name, settings=settings, sample_gpus=False) as run:
            for step in (1, 2, 3):
                run.log_step(step, loss=2.0 - step * 0.1, learning_rate=1e-4, grad_norm=1.0)
        runs[name] = run.run_id
    pipeline = build_ingest(settings, on_alert=lambda alert: None)
    pipeline.drain(idle_seconds=1.0, deadline=None)
    pipeline.close()
    client = connect_store(settings.store_dsn)
    try:
        now = datetime.now(timezone.utc).replace(microsecond=0)
        flapping = [alert_row(runs["flappy"], "loss_spike", 10 * i, state,
                              now - timedelta(minutes=10 - i) + timedelta(seconds=10 * (state == "resolved")))
                    for i in range(5) for state in ("firing", "resolved")]
        storm = [alert_row(runs[name], "loss_not_finite", 3, "firing", now - timedelta(seconds=30 - i), "block")
                 for i, name in enumerate(("storm-a", "storm-b", "storm-c"))]
        client.insert("alerts", flapping + storm, column_names=ALERT_COLUMNS)
        silenced = SilenceBook(client).create_silence("ops-alice", "node 7 drained", for_seconds=3600,
                                                      run_id=runs["quiet"])
        ended = Silence(silence_id="sil-ended", starts_at=now - timedelta(hours=2), ends_at=now - timedelta(hours=1),
                        created_at=now - timedelta(hours=2), updated_at=now, experiment="paging", reason="old")
        client.insert("silences", [ended.row()], column_names=COLUMNS)
    finally:
        client.close()
    return settings.store_dsn, {**runs, "silence": silenced["silence_id"]}


def frame_with(at: AppTest, column: str) -> pd.DataFrame:
    return next(frame.value for frame in at.dataframe if column in frame.value.columns)


def test_alerts_view_shows_flapping_storms_and_active_silences(app_test, paging_store):
    dsn, ids = paging_store
    at = view(app_test(dsn), "alerts")
    flapping = frame_with(at, "transitions")
    assert len(flapping) == 1 and flapping.iloc[0]["rule"] == "loss_spike"
    assert (flapping.iloc[0]["incidents"], flapping.iloc[0]["transitions"]) == (5, 10)
    assert ids["flappy"][:8] in flapping.iloc[0]["run"]
    storms = frame_with(at, "runs")
    assert list(storms["rule"]) == ["loss_not_finite"] and storms.iloc[0]["runs"] == 3
    assert storms.iloc[0]["group"] == "experiment=paging"
    assert all(ids[name][:8] in storms.iloc[0]["run list"] for name in ("storm-a", "storm-b", "storm-c"))
    silences = frame_with(at, "silence")
    assert list(silences["silence"]) == [ids["silence"]], "active silences only"
    assert silences.iloc[0]["matchers"] == f"run={ids['quiet']}" and silences.iloc[0]["reason"] == "node 7 drained"


def test_fleet_marks_silenced_runs(app_test, paging_store):
    dsn, ids = paging_store
    at = view(app_test(dsn), "fleet")
    fleet = at.dataframe[0].value.set_index("run id")
    assert fleet.loc[ids["quiet"], "silenced"].startswith("until ")
    assert (fleet.drop(index=ids["quiet"])["silenced"] == "").all()
    assert {m.label: m.value for m in at.metric}["silenced"] == "1"
