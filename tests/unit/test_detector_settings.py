"""Detector thresholds from the config file: per deployment, per experiment, and refused when wrong."""

import re
from pathlib import Path

import pytest

from trainwire.consumers.detectors import RULES, DetectorEngine
from trainwire.infra.config import ConfigError, load_settings
from trainwire.infra.detector_settings import DetectorParameters

DOCS = Path(__file__).resolve().parents[2] / "docs" / "detectors.md"


def settings_from(monkeypatch, tmp_path, toml):
    config = tmp_path / "trainwire.toml"
    config.write_text(toml)
    monkeypatch.setenv("TRAINWIRE_CONFIG", str(config))
    monkeypatch.setenv("TRAINWIRE_HOME", str(tmp_path))
    return load_settings()


def test_deployment_values_and_experiment_overrides(monkeypatch, tmp_path):
    detectors = settings_from(monkeypatch, tmp_path, """
[detectors.loss_spike]
factor = 2.0
[detectors.experiments."my-exp".throughput_low]
min_tokens_per_s = 50
[detectors.experiments."my-exp".grad_norm_high]
enabled = false
""").detectors
    mine, other = detectors.for_experiment("my-exp"), detectors.for_experiment("other")
    assert mine.throughput_low.min_tokens_per_s == 50 and other.throughput_low.min_tokens_per_s == 100
    assert mine.throughput_low.window == other.throughput_low.window == 5
    assert mine.loss_spike.factor == other.loss_spike.factor == 2.0  # the deployment's value, not the default
    assert not mine.grad_norm_high.enabled and other.grad_norm_high.enabled


@pytest.mark.parametrize("toml, key, says", [
    ("[detectors.los_spike]\nfactor = 2.0\n", "detectors.los_spike", "Extra inputs are not permitted"),
    ("[detectors.loss_spike]\nfactr = 2.0\n", "detectors.loss_spike.factr", "Extra inputs are not permitted"),
    ("[detectors.loss_spike]\nfactor = \"2\"\n", "detectors.loss_spike.factor", "valid number"),
    ("[detectors.loss_spike]\nfactor = 0.5\n", "detectors.loss_spike.factor", "greater than 1"),
    ("[detectors.run_stalled]\nenabled = \"no\"\n", "detectors.run_stalled.enabled", "valid boolean"),
    ('[detectors.experiments."x".throughput_low]\nwindow = 2.5\n', "detectors.experiments.x.throughput_low.window",
     "valid integer"),
    ('[detectors.experiments."x".nope]\nenabled = false\n', "detectors.experiments.x.nope", "Extra inputs"),
])
def test_a_bad_detector_key_is_named(monkeypatch, tmp_path, toml, key, says):
    with pytest.raises(ConfigError, match=re.escape(f"{key} (in ") + ".*" + re.escape(says)):
        settings_from(monkeypatch, tmp_path, toml)


def test_a_disabled_rule_is_not_run(monkeypatch, tmp_path):
    settings = settings_from(monkeypatch, tmp_path, "[detectors.loss_not_finite]\nenabled = false\n")
    engine = DetectorEngine(settings.detectors)
    record = {"run_id": "r", "experiment": "e", "team": "", "host": "", "seq": 1, "ts_ms": 0, "step": 1}
    assert engine.observe("step", {**record, "loss": float("nan")}) == []


HYSTERESIS = ("fire_after", "fire_after_seconds", "clear_after")


def test_every_rule_has_settings_and_every_key_is_documented_with_its_default():
    assert [rule.rule_id for rule in RULES] == list(DetectorParameters.model_fields)
    rows = [line for line in DOCS.read_text().splitlines() if line.startswith("| `")]
    for rule, info in DetectorParameters.model_fields.items():
        assert any(row.startswith(f"| `{rule}` |") for row in rows), rule
        for name, field in info.annotation.model_fields.items():
            if name == "enabled" or name in HYSTERESIS:
                continue
            default = "none" if field.default is None else f"`{field.default}`"
            assert any(row.startswith(f"| `{rule}` |") and f"| `{name}` | {default} |" in row for row in rows), \
                f"docs/detectors.md: {rule}.{name} (default {default})"
        if "fire_after" in info.annotation.model_fields:  # the hysteresis table: rule, then its three keys
            defaults = " | ".join(f"`{info.annotation.model_fields[name].default}`" for name in HYSTERESIS)
            assert f"| `{rule}` | {defaults} |" in rows, f"docs/detectors.md hysteresis: {rule}"
