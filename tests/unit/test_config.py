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
    env = {"TRAINWIRE_HOME": str(tmp_path), "TRAINWIRE_KAFKA": "nope", "PATH": "/usr/bin:/bin"}
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
