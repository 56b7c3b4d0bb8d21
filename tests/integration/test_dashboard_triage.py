"""The dashboard as an operator first meets it (issue 17, items 6 and 7): it opens on the Fleet with the run that
needs a person on top and highlighted, every view defaults to that run, NaN reads as NaN, severities are coloured,
comparisons show differing seeds, Audit shows what was recorded, threshold lines follow the configuration, and
starting it prints one URL. AppTest on a store three simulated runs filled through ingest, and a real Chromium."""

from __future__ import annotations

import io
import re
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from PIL import Image
from test_dashboard import (ALERT_COLUMNS, ARTIFACTS, alert_row, app_test, browser, chart, chromium,  # noqa: F401
                            no_exception, serving, sidebar_run, text, view)

from trainwire.consumers.service import build_ingest
from trainwire.infra.config import Settings
from trainwire.infra.store import connect_store
from trainwire.producers import init
from trainwire.producers.session import close_all
from trainwire.producers.simulate import JobPlan, SimulatedGpus, run_job, simulated_artifacts, simulated_lineage

STEPS = 60
RED, AMBER, WHITE = (255, 214, 214), (255, 232, 194), (255, 255, 255)  # dashboard/views/fleet.py's highlights
HARDWARE = {"gpu_type": "NVIDIA H100 80GB HBM3", "gpu_count": 8, "gpu_driver_version": "550.54.15",
            "cuda_version": "12.4", "world_size": 8}


@pytest.fixture(scope="module")
def triage_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, str]]:
    """Three runs, oldest first, stored through ingest with their gates evaluated: `diverged` (seed 42, NaN loss
    from step 36: a firing block alert, gates blocked, stopped), `halted` (seed 43, healthy but stopped by hand) and
    `healthy` (seed 44, completed, gates passed, so Candidate; hardware and config file recorded; one warning
    incident that fired and resolved). The newest run is the healthy one, so recency alone puts it first."""
    home = tmp_path_factory.mktemp("dashboard-triage")
    settings = Settings(home=home, batch_max_seconds=0.2)
    config = home / "train.yaml"
    config.write_text("learning_rate: 2.0e-4\nlora_rank: 16\n")
    runs = {}
    for job, (name, fault, status) in enumerate((("diverged", "nan", "stopped"), ("halted", None, "stopped"),
                                                 ("healthy", None, "completed"))):
        recorded = {"config_file": config.name, "config_sha256": "sha256:" + "c" * 64, **HARDWARE} \
            if name == "healthy" else {}
        run = init("triage", name, {"learning_rate": 2e-4, "lora_rank": 16}, settings=settings,
                   gpu_source=SimulatedGpus(seed=job), total_steps=STEPS, **simulated_lineage(job), **recorded)
        run_job(run, JobPlan(steps=STEPS, fault=fault, seed=job))
        run.finish(status, artifacts=simulated_artifacts(run.run_id, STEPS))
        runs[name] = run.run_id
        time.sleep(0.05)  # each run heard from after the one before
    close_all()
    pipeline = build_ingest(settings, on_alert=lambda alert: None)
    pipeline.drain(idle_seconds=1.0, deadline=None)
    pipeline.close()
    client = connect_store(settings.store_dsn)
    try:
        fired = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(minutes=5)
        client.insert("alerts", [alert_row(runs["healthy"], "throughput_low", 12, "firing", fired, "warning"),
                                 alert_row(runs["healthy"], "throughput_low", 12, "resolved",
                                           fired + timedelta(minutes=1), "warning")], column_names=ALERT_COLUMNS)
    finally:
        client.close()
    return settings.store_dsn, runs


def row_styles(element) -> dict[int, str]:
    """The CSS a pandas Styler gave each row of a shown table (its first cell's), by row position."""
    styles: dict[int, str] = {}
    for selectors, css in re.findall(r"([^{}]+)\{([^}]*)\}", element.proto.arrow_data.styler.styles):
        for row in re.findall(r"_row(\d+)_col0\b", selectors):
            styles[int(row)] = css.strip()
    return styles


def cell_styles(element, column: str) -> list[str]:
    """The CSS of each cell of one column, top to bottom ("" where none)."""
    index = list(element.value.columns).index(column)
    found: dict[int, str] = {}
    for selectors, css in re.findall(r"([^{}]+)\{([^}]*)\}", element.proto.arrow_data.styler.styles):
        for row in re.findall(rf"_row(\d+)_col{index}\b", selectors):
            found[int(row)] = css.strip()
    return [found.get(row, "") for row in range(len(element.value))]


# --- AppTest ---------------------------------------------------------------------------------------------------------

def test_the_dashboard_opens_on_the_fleet_with_the_diverged_run_on_top_in_red(app_test, triage_store):
    dsn, runs = triage_store
    at = app_test(dsn)
    assert not at.exception and at.title[0].value == "Fleet", "the landing page is the Fleet"
    table = at.dataframe[0]
    fleet = table.value
    assert list(fleet["run"]) == ["diverged", "halted", "healthy"], "urgent first, not newest first"
    top = fleet.iloc[0]
    assert top["loss"] == "NaN" and top["gates"] == "blocked" and top["stage"] == "–"
    assert top["status"] == "stopped" and "block alert firing" in top["attention"]
    assert fleet.iloc[1]["attention"] == "stopped" and fleet.iloc[2]["attention"] == ""
    assert (fleet.iloc[2]["gates"], fleet.iloc[2]["stage"]) == ("passed", "Candidate")
    assert re.fullmatch(r"\d+\.\d{4}", fleet.iloc[2]["loss"])
    styles = row_styles(table)
    assert "#ffd6d6" in styles[0] and "#ffe8c2" in styles[1] and not styles.get(2), styles
    assert {m.label: m.value for m in at.metric}["block/critical"] == "1"


def test_every_one_run_view_opens_on_the_most_urgent_run(app_test, triage_store):
    dsn, runs = triage_store
    at = app_test(dsn)
    assert at.selectbox(key="run").value == runs["diverged"], "not the newest run, the one on fire"
    at = view(at, "training")
    assert runs["diverged"] in text(at) and "gates **blocked**" in text(at)


def test_comparison_lists_differing_seeds_and_marks_the_run_that_ended_on_nan(app_test, triage_store):
    dsn, runs = triage_store
    at = view(app_test(dsn), "compare")
    at.multiselect(key="compare-runs").set_value([runs["diverged"], runs["healthy"]]).run()
    assert not at.exception
    table = at.dataframe[0].value
    assert {"seed", "data_seed", "numpy_seed"} <= set(table.index), "seeds differed and are listed"
    assert list(table.loc["seed"]) == ["42", "44"]
    marked = [column for column in table.columns if column.endswith("⚠ NaN loss")]
    assert len(marked) == 1 and runs["diverged"][:8] in marked[0]
    assert any("ended on a NaN loss" in warning.value for warning in at.warning)


def test_alerts_colour_severities_and_leave_a_firing_incidents_resolved_cell_blank(app_test, triage_store):
    dsn, runs = triage_store
    at = view(app_test(dsn), "alerts")
    table = at.dataframe[0]
    incidents = table.value.assign(style=cell_styles(table, "severity"))
    firing = incidents[incidents["state"] == "firing"]
    assert len(firing) and (firing["resolved"] == "").all(), "blank, not None"
    resolved = incidents[incidents["state"] == "resolved"]
    assert list(resolved["rule"]) == ["throughput_low"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", resolved.iloc[0]["resolved"])
    by_severity = dict(zip(incidents["severity"], incidents["style"]))
    assert "background-color" in by_severity["block"] and "background-color" in by_severity["warning"]
    assert by_severity["block"] != by_severity["warning"]


def test_audit_shows_recorded_hardware_and_config_and_rounds_gate_messages(app_test, triage_store):
    dsn, runs = triage_store
    at = app_test(dsn)
    at = view(at.selectbox(key="run").select(runs["healthy"]).run(), "audit")
    shown = {row["field"]: row["value"] for frame in at.dataframe if "field" in frame.value.columns
             for _, row in frame.value.iterrows()}
    assert shown["GPU type"] == HARDWARE["gpu_type"] and shown["GPU count"] == "8" and shown["driver"] == "550.54.15"
    assert shown["config file"] == "train.yaml" and shown["hyperparameter lora_rank"] == "16"

    at = view(at.selectbox(key="run").select(runs["diverged"]).run(), "audit")
    shown = {row["field"]: row["value"] for frame in at.dataframe if "field" in frame.value.columns
             for _, row in frame.value.iterrows()}
    seen = [value for field, value in shown.items() if field.startswith("GPU 0 on ")]
    assert len(seen) == 1 and "NVIDIA A100-SXM4-80GB" in seen[0], "no GPU type recorded: the GPUs its samples name"
    messages = [m for table in at.table for m in table.value.get("message", [])]
    assert any(m.startswith("loss not finite (initial ") for m in messages), messages
    assert not [m for m in messages if re.search(r"\d\.\d{5,}", m)], "long decimals rounded"


def test_gpu_threshold_lines_are_labelled_and_follow_the_configured_detectors(app_test, triage_store, tmp_path,
                                                                            monkeypatch):
    dsn, runs = triage_store
    config = tmp_path / "trainwire.toml"
    config.write_text("[detectors.gpu_temperature_high]\ncelsius = 70.5\n\n"
                      "[detectors.experiments.triage.gpu_utilization_low]\nmin_utilization_pct = 55.0\n")
    monkeypatch.setenv("TRAINWIRE_CONFIG", str(config))
    at = view(app_test(dsn), "resources")
    temperature = chart(at, "temperature °C")
    assert list(temperature["rule"]["y"]) == [70.5], "the deployment's threshold, not the default 85"
    assert list(temperature["text"]["threshold"]) == ["gpu_temperature_high ≥ 70.5 °C"]
    utilisation = chart(at, "utilisation %")
    assert list(utilisation["text"]["threshold"]) == ["gpu_utilization_low < 55 %"], "the experiment's override"


def test_starting_the_dashboard_prints_one_url_and_none_of_streamlits_banner(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    with serving(home, "dashboard", "--host", "0.0.0.0"):
        pass
    [log] = home.glob("server-*.log")
    output = log.read_text()
    port = log.stem.removeprefix("server-")
    assert [line for line in output.splitlines() if "http" in line] == [
        f"dashboard on http://localhost:{port} (Ctrl-C to stop)"], output
    for banner in ("Network URL", "External URL", "Did not auto detect", "You can now view", "Uvicorn"):
        assert banner not in output, output


# --- A real browser ------------------------------------------------------------------------------------------------

def row_colours(grid, rows: int) -> list[tuple[int, int, int]]:
    """The background of each data row of a Streamlit table as drawn (the grid is a canvas): each row's most common
    pixel colour, past the selection checkboxes."""
    image = Image.open(io.BytesIO(grid.screenshot())).convert("RGB")
    height = image.height / (rows + 1)  # the header is one row high
    colours = []
    for row in range(1, rows + 1):
        y = int((row + 0.3) * height)
        colours.append(Counter(image.getpixel((x, y)) for x in range(60, image.width - 10)).most_common(1)[0][0])
    return colours


def test_the_fleet_landing_page_shows_the_nan_run_on_top_highlighted_in_a_browser(triage_store, browser):
    dsn, runs = triage_store
    home = Path(dsn.removeprefix("chdb://")).parent
    with serving(home, "dashboard") as url:
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(url)
        page.get_by_role("heading", name="Fleet", exact=True).wait_for(timeout=30_000)
        grid = page.locator('[data-testid="stDataFrame"]').first
        first = grid.locator('[role="row"][aria-rowindex="2"]')
        first.wait_for(state="attached", timeout=30_000)  # the grid draws on a canvas; its rows for a reader are hidden
        assert first.text_content().startswith("diverged") and "NaN" in first.text_content()
        assert "blocked" in first.text_content() and "stopped" in first.text_content()
        page.wait_for_timeout(1_000)  # the canvas painted
        no_exception(page)
        deadline = time.monotonic() + 15
        while (colours := row_colours(grid, 3)) != [RED, AMBER, WHITE] and time.monotonic() < deadline:
            page.wait_for_timeout(250)  # the live refresh fades the table while it reruns (slower on a busy machine)
        assert colours == [RED, AMBER, WHITE]
        assert runs["diverged"][:8] in sidebar_run(page), "the sidebar opened on the urgent run"
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard-fleet-landing.png"))
