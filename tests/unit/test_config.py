import os
import re
import subprocess
import sys

import pytest

from trainwire.infra.config import ConfigError, load_settings


def test_defaults_are_embedded(monkeypatch, tmp_path):
    monkeypatch.setenv("TRAINWIRE_HOME", str(tmp_path))
    settings = load_settings()
    assert settings.kafka is None
    assert settings.store_dsn == f"chdb://{tmp_path.resolve()}/chdb"
    assert settings.local_log_path == tmp_path.resolve() / "log.db"


@pytest.mark.parametrize("variable, value, says", [
    ("TRAINWIRE_KAFKA", "not a bootstrap", "TRAINWIRE_KAFKA"),
    ("TRAINWIRE_STORE", "mysql://x", "TRAINWIRE_STORE"),
    ("TRAINWIRE_STORE", "chdb://relative/dir", "absolute path"),
    ("TRAINWIRE_BATCH_MAX_ROWS", "0", "TRAINWIRE_BATCH_MAX_ROWS"),
    ("TRAINWIRE_QUEUE_SIZE", "lots", "TRAINWIRE_QUEUE_SIZE"),
])
def test_invalid_setting_names_its_variable(monkeypatch, variable, value, says):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=says):
        load_settings()


def test_unknown_variable_is_refused(monkeypatch):
    monkeypatch.setenv("TRAINWIRE_KAFAK", "127.0.0.1:9092")
    with pytest.raises(ConfigError, match="TRAINWIRE_KAFAK"):
        load_settings()


def test_cli_fails_at_start_with_the_key(tmp_path):
    env = {"TRAINWIRE_HOME": str(tmp_path), "TRAINWIRE_KAFKA": "no such/broker", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-m", "trainwire", "runs"], env=env, capture_output=True, text=True)
    assert result.returncode == 2
    assert "TRAINWIRE_KAFKA" in result.stderr


def test_a_config_file_is_read_and_the_environment_wins(monkeypatch, tmp_path):
    config = tmp_path / "trainwire.toml"
    config.write_text('kafka = "broker-1:9092,broker-2:9092"\nteam = "nlp"\nqueue_size = 5000\n')
    monkeypatch.setenv("TRAINWIRE_CONFIG", str(config))
    monkeypatch.setenv("TRAINWIRE_TEAM", "vision")
    settings = load_settings()
    assert settings.kafka == "broker-1:9092,broker-2:9092" and settings.queue_size == 5000
    assert settings.team == "vision"
    assert load_settings(kafka="cli:9092").kafka == "cli:9092"


@pytest.mark.parametrize("content, says", [
    ("queue_size = -3\n", "queue_size (in "),
    ("kafak = 'x:1'\n", "kafak (in "),
    ("this is not toml", "cannot read"),
])
def test_a_bad_config_file_names_the_key_and_the_file(monkeypatch, tmp_path, content, says):
    config = tmp_path / "trainwire.toml"
    config.write_text(content)
    monkeypatch.setenv("TRAINWIRE_CONFIG", str(config))
    with pytest.raises(ConfigError, match=re.escape(says)):
        load_settings()


def test_a_missing_config_file_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("TRAINWIRE_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match="TRAINWIRE_CONFIG: no such file"):
        load_settings()


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No TRAINWIRE_* variable of the machine running the tests, and a private home."""
    for name in [k for k in os.environ if k.startswith("TRAINWIRE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("TRAINWIRE_HOME", str(tmp_path))
    return monkeypatch


@pytest.mark.parametrize("variable, value", [
    ("TRAINWIRE_HEARTBEAT_SECONDS", "inf"),  # killed the heartbeat thread (OverflowError in Event.wait)
    ("TRAINWIRE_HEARTBEAT_SECONDS", "1e12"),
    ("TRAINWIRE_HEARTBEAT_SECONDS", "nan"),
    ("TRAINWIRE_HEARTBEAT_SECONDS", "0.01"),
    ("TRAINWIRE_GPU_SAMPLE_SECONDS", "inf"),
    ("TRAINWIRE_GPU_SAMPLE_SECONDS", "1e12"),
    ("TRAINWIRE_FLUSH_TIMEOUT_SECONDS", "inf"),
    ("TRAINWIRE_FLUSH_TIMEOUT_SECONDS", "7200"),
    ("TRAINWIRE_BATCH_MAX_SECONDS", "-inf"),
    ("TRAINWIRE_BATCH_MAX_SECONDS", "120"),
    ("TRAINWIRE_BATCH_MAX_ROWS", "1000000000"),
    ("TRAINWIRE_QUEUE_SIZE", "100000000000"),
    ("TRAINWIRE_KAFKA", "127.0.0.1:99999"),
    ("TRAINWIRE_KAFKA", "127.0.0.1:0"),
    ("TRAINWIRE_KAFKA", "broker-1:9092,broker-2:65536"),
    ("TRAINWIRE_ACCEPT_DAYS_BACK", "inf"),
    ("TRAINWIRE_DEAD_LETTER_MAX_RATIO", "0"),
    ("TRAINWIRE_DEAD_LETTER_MAX_CONSECUTIVE", "0"),
    ("TRAINWIRE_ALERTING", '{"retry_max_seconds": "inf"}'),
    ("TRAINWIRE_ALERTING", '{"sinks": [{"kind": "webhook", "url": "http://h/x", "timeout_seconds": 1e12}]}'),
])
def test_out_of_range_settings_are_refused_naming_the_variable(clean_env, variable, value):
    clean_env.setenv(variable, value)
    with pytest.raises(ConfigError, match=variable):
        load_settings()


@pytest.mark.parametrize("variable, value", [
    ("TRAINWIRE_HEARTBEAT_SECONDS", "3600"), ("TRAINWIRE_HEARTBEAT_SECONDS", "0.1"),
    ("TRAINWIRE_GPU_SAMPLE_SECONDS", "0.5"), ("TRAINWIRE_FLUSH_TIMEOUT_SECONDS", "0"),
    ("TRAINWIRE_BATCH_MAX_SECONDS", "60"), ("TRAINWIRE_KAFKA", "127.0.0.1:65535"), ("TRAINWIRE_KAFKA", "[::1]:1"),
])
def test_settings_at_the_edges_of_their_range_are_accepted(clean_env, variable, value):
    clean_env.setenv(variable, value)
    load_settings()


def test_a_config_file_value_out_of_range_names_the_key(clean_env, tmp_path):
    config = tmp_path / "trainwire.toml"
    config.write_text('heartbeat_seconds = inf\n')
    clean_env.setenv("TRAINWIRE_CONFIG", str(config))
    with pytest.raises(ConfigError, match=re.escape("heartbeat_seconds (in ")):
        load_settings()
