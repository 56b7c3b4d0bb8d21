"""The [alerting] keys of flapping, grouping, holds, silences and rate limits: defaults, and a value out of range
(NaN and infinity included) stops start-up naming the key."""

import pytest

from trainwire.infra.config import ConfigError, load_settings


def settings_from(tmp_path, monkeypatch, text: str):
    path = tmp_path / "trainwire.toml"
    path.write_text(text)
    monkeypatch.setenv("TRAINWIRE_CONFIG", str(path))
    monkeypatch.delenv("TRAINWIRE_ALERTING", raising=False)
    return load_settings()


def test_defaults_and_a_full_configuration(tmp_path, monkeypatch):
    alerting = settings_from(tmp_path, monkeypatch, "").alerting
    assert (alerting.flap_threshold, alerting.flap_window_seconds, alerting.flap_settle_seconds) == (3, 1800, 300)
    assert (alerting.group_by, alerting.group_wait_seconds, alerting.resolve_hold_seconds) == (("experiment",), 10, 5)
    assert alerting.sinks[0].rate_limit_per_minute == 30
    alerting = settings_from(tmp_path, monkeypatch, (
        '[alerting]\nflap_threshold = 5\nflap_window_seconds = 600\nflap_settle_seconds = 120\n'
        'group_by = ["team", "host"]\ngroup_wait_seconds = 0\nresolve_hold_seconds = 30\n'
        'silence_refresh_seconds = 1\n[[alerting.sinks]]\nkind = "console"\nrate_limit_per_minute = 0\n')).alerting
    assert alerting.group_by == ("team", "host") and alerting.group_wait_seconds == 0
    assert alerting.sinks[0].rate_limit_per_minute == 0 and alerting.flap_threshold == 5


@pytest.mark.parametrize("config, key", [
    ("flap_threshold = 0", "alerting.flap_threshold"),
    ("flap_window_seconds = inf", "alerting.flap_window_seconds"),
    ("flap_window_seconds = nan", "alerting.flap_window_seconds"),
    ("flap_settle_seconds = 0", "alerting.flap_settle_seconds"),
    ("group_wait_seconds = -1", "alerting.group_wait_seconds"),
    ("group_wait_seconds = 1e9", "alerting.group_wait_seconds"),
    ('group_by = ["cluster"]', "alerting.group_by"),
    ('group_by = ["host", "host"]', "group_by names a label twice"),
    ("resolve_hold_seconds = inf", "alerting.resolve_hold_seconds"),
    ("silence_refresh_seconds = 0", "alerting.silence_refresh_seconds"),
    ('sinks = [{ kind = "console", rate_limit_per_minute = -1 }]', "alerting.sinks.0.rate_limit_per_minute"),
])
def test_a_value_out_of_range_stops_start_up_naming_the_key(tmp_path, monkeypatch, config, key):
    with pytest.raises(ConfigError, match=key):
        settings_from(tmp_path, monkeypatch, f"[alerting]\n{config}\n")
