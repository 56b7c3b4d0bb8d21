"""The main job as a user runs it: `trainwire demo --headless --json`, on the local log and on the broker."""

import json
import os
import subprocess
import sys

import pytest


def demo(home, *extra):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TRAINWIRE_")}, "TRAINWIRE_HOME": str(home)}
    result = subprocess.run(
        [sys.executable, "-m", "trainwire", "demo", "--headless", "--json", "--jobs", "4", "--steps", "200", *extra],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout), result.stderr


def check_report(report):
    assert report["events_stored"] == report["events_produced"] > 4 * 200
    assert len(report["runs"]) == 4
    not_finite = [a for a in report["alerts"] if a["rule"] == "loss_not_finite"]
    assert len(not_finite) == 1 and not_finite[0]["severity"] == "block" and not_finite[0]["step"] == 120


def test_demo_on_embedded_defaults(tmp_path):
    report, stderr = demo(tmp_path, "--inject", "nan")
    check_report(report)
    assert report["store"] == f"chdb://{tmp_path.resolve()}/chdb"
    assert f"ALERT [BLOCK] loss_not_finite on run {report['runs'][0]} (demo-sft) at step 120" in stderr  # paged


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
