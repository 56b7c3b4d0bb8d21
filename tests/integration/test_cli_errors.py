"""Every failure of the `trainwire` command is one line a person can read (issue 17, item 4): it names what was
wrong and what to do, exits with the code README's table gives, prints no traceback and no library's log flood, and
under --json is one JSON object on stdout. Run through the real command, on a real (empty) chdb home."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainwire.cli_errors import describe_failure, terminal_safe
from trainwire.infra.store import connect_store


def trainwire(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.upper().startswith("TRAINWIRE_")}
    return subprocess.run([sys.executable, "-m", "trainwire", *args], capture_output=True, text=True, timeout=120,
                          env={**environ, "TRAINWIRE_HOME": str(home), **env})


def assert_one_line_error(result: subprocess.CompletedProcess, exit_code: int, *says: str) -> str:
    """The command failed with `exit_code` and one line on stderr (no traceback) that says each of `says`."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == exit_code, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("trainwire: error: "), lines
    for text in says:
        assert text in lines[0], lines[0]
    return lines[0]


def test_an_unreachable_store_is_one_line_naming_the_setting(tmp_path):
    result = trainwire(tmp_path, "runs", TRAINWIRE_STORE="http://127.0.0.1:1")
    assert_one_line_error(result, 9, "cannot reach the store at http://127.0.0.1:1", "connection refused",
                          "TRAINWIRE_STORE")


def test_gates_says_an_unreachable_store_with_its_not_evaluated_code_never_blocked(tmp_path):
    assert_one_line_error(trainwire(tmp_path, "gates", "abcd", TRAINWIRE_STORE="http://127.0.0.1:1"), 8,
                          "cannot reach the store")


def test_under_json_an_error_is_one_json_object_on_stdout_with_no_secret(tmp_path):
    result = trainwire(tmp_path, "runs", "--json", TRAINWIRE_STORE="http://reader:hunter2@127.0.0.1:1")
    assert result.returncode == 9 and result.stderr == "", result.stderr[-2000:]
    error = json.loads(result.stdout)
    assert error["exit_code"] == 9 and "TRAINWIRE_STORE" in error["error"] and "hunter2" not in result.stdout


def test_an_unreachable_kafka_fails_fast_with_one_line(tmp_path):
    """The demo read the cluster's metadata for 30 s, then died in a traceback; now Kafka is checked first."""
    started = time.monotonic()
    result = trainwire(tmp_path, "demo", "--headless", "--jobs", "1", "--steps", "3", "--kafka", "127.0.0.1:1")
    assert_one_line_error(result, 5, "cannot connect to Kafka at 127.0.0.1:1", "TRAINWIRE_KAFKA")
    assert time.monotonic() - started < 25
    assert not (tmp_path / "chdb").exists()  # nothing was started


def test_a_store_no_consumer_has_set_up_reads_as_empty(tmp_path):
    result = trainwire(tmp_path, "runs")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "no runs" in result.stdout


def test_a_server_store_without_tables_says_to_run_a_consumer_first(tmp_path):
    """A server store is never migrated by a reader: a query on a table no consumer has made says what to run."""
    client = connect_store("chdb://" + str(tmp_path / "store"))
    try:
        with pytest.raises(Exception) as raised:
            client.query("SELECT count() FROM runs")
    finally:
        client.close()
    failure = describe_failure(raised.value, lambda: "https://reader:s3cret@clickhouse.example:8443")
    assert failure is not None and failure.exit_code == 9
    assert "trainwire up" in failure.message and "trainwire consume" in failure.message
    assert "s3cret" not in failure.message and "clickhouse.example" in failure.message


@pytest.mark.parametrize("args, says", [
    (("dashboard", "--port", "70000"), "argument --port: 70000 is not a port (1-65535)"),
    (("up", "--port", "0"), "argument --port: 0 is not a port"),
    (("consume", "--metrics-port", "65536"), "argument --metrics-port: 65536 is not a port"),
    (("demo", "--headless", "--step-seconds", "-1"), "argument --step-seconds: -1 seconds: expected at least 0"),
    (("demo", "--headless", "--step-seconds", "nan"), "argument --step-seconds"),
    (("consume", "--drain", "--idle-seconds", "0"), "argument --idle-seconds: 0 seconds: expected more than 0"),
])
def test_an_option_out_of_range_is_refused_before_anything_starts(tmp_path, args, says):
    assert_one_line_error(trainwire(tmp_path, *args), 2, says)
    assert not (tmp_path / "chdb").exists()


def test_an_option_error_under_json_is_json(tmp_path):
    result = trainwire(tmp_path, "dashboard", "--port", "70000", "--json")
    assert result.returncode == 2 and result.stderr == ""
    assert json.loads(result.stdout) == {"error": "argument --port: 70000 is not a port (1-65535)", "exit_code": 2}


@pytest.mark.parametrize("home", ["/proc/x/trainwire", "FILE"])
def test_an_unusable_home_names_trainwire_home(tmp_path, home):
    if home == "FILE":
        (tmp_path / "file").write_text("")
        home = str(tmp_path / "file")
    result = trainwire(Path(home), "runs")
    assert_one_line_error(result, 2, f"TRAINWIRE_HOME {home!r}", "set TRAINWIRE_HOME to a directory")


def test_a_setting_that_is_not_json_names_its_variable(tmp_path):
    line = assert_one_line_error(trainwire(tmp_path, "runs", TRAINWIRE_ALERTING="not json"), 2,
                                 "TRAINWIRE_ALERTING: not valid JSON")
    assert "cannot read None" not in line


def test_a_misspelt_variable_suggests_the_nearest_name(tmp_path):
    assert_one_line_error(trainwire(tmp_path, "runs", TRAINWIRE_KAFAK="127.0.0.1:9092"), 2,
                          "unknown setting TRAINWIRE_KAFAK: did you mean TRAINWIRE_KAFKA?")


def test_stored_text_cannot_drive_the_terminal(tmp_path):
    """A silence's reason is stored text printed back: its escape sequence is shown, not obeyed."""
    created = trainwire(tmp_path, "alerts", "silence", "--rule", "loss_nan", "--for", "1h", "--reason", "a\x1b[31mb")
    assert created.returncode == 0, created.stderr[-2000:]
    listed = trainwire(tmp_path, "alerts", "silences")
    assert listed.returncode == 0 and "\x1b" not in listed.stdout and "a\\x1b[31mb" in listed.stdout


def test_terminal_safe_escapes_every_control_character_but_the_line_break():
    assert terminal_safe("run\x1b]0;owned\x07\rname\x9b\nnext\tcol") == "run\\x1b]0;owned\\x07\\rname\\x9b\nnext\\tcol"
    assert terminal_safe("plain ünïcode ✓") == "plain ünïcode ✓"
