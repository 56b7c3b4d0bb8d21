"""The CLI's lists as tables, the audit and silence commands naming runs, and no "None" anywhere (issue 17, item 5):
`alerts status`, `alerts silences`, `dead-letters list` and `audit log` print a header over aligned columns; `audit
RUN`, `audit export RUN`, `audit log --run RUN` and `alerts silence --run RUN` take an id prefix or a run name
(unknown: exit 6, ambiguous: exit 7 with the candidates); a missing registry stage is null in JSON and "none yet"
for people; a failing store or `up` API is one line, JSON under --json.

Real local log, real ingest (detectors, dead letters), real embedded ClickHouse, a real outbox; the CLI through
`main`.
"""

import json
import os
import re

import pytest

from tests.cli_home import DIVERGED, TWIN_A, TWIN_B, cli, three_runs_home
from trainwire.consumers.alerting.outbox import Outbox
from trainwire.consumers.alerting.service import outbox_path
from trainwire.infra.log import open_producer
from trainwire.infra.log.topics import EVENTS
from trainwire.schemas import Alert

TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


def send_a_record_ingest_refuses(settings) -> None:
    producer = open_producer(settings)
    producer.append(settings.topic(EVENTS), b"some-key", b"\x00\x01 not avro at all")
    assert producer.flush(30) == 0
    producer.close()


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """The three runs, a record ingest dead-lettered, and an outbox with a delivered page and a failed one."""
    with three_runs_home(tmp_path_factory.mktemp("tables"), steps=40,
                         before_ingest=send_a_record_ingest_refuses) as settings:
        outbox = Outbox(outbox_path(settings))
        outbox.enqueue([("webhook", page("delivered")), ("webhook", page("failed"))])
        outbox.delivered(outbox.claim("webhook"))
        outbox.failed(outbox.claim("webhook"), "HTTP 400 bad payload")
        outbox.close()
        yield settings


def page(key: str) -> Alert:
    return Alert(run_id=DIVERGED, experiment="cli-sft", team="nlp", ts_ms=1_700_000_000_000, rule="loss_not_finite",
                 severity="block", state="firing", step=5, value=float("nan"), threshold=None,
                 message="train loss is nan at step 5", dedup_key=f"{DIVERGED}/{key}")


def under(header: str, row: str, title: str, right: bool = False) -> str:
    """The cell of `row` in the column headed `title`: it starts where its header starts (ends, right-aligned)."""
    start = header.index(title)
    if right:
        end = start + len(title)
        return row[:end].rsplit(" ", 1)[-1]
    return row[start:].split("  ")[0]


def test_alerts_status_is_a_table_of_sinks_then_one_of_failed_pages(home, capsys):
    code, out, _ = cli(capsys, "alerts", "status")
    sinks, failures = out.rstrip("\n").split("\n\nfailed pages:\n")
    header, row = sinks.split("\n")
    assert code == 1 and header.split()[:4] == ["Sink", "Pending", "Delivered", "Failed"]
    assert under(header, row, "Sink") == "webhook"
    assert (under(header, row, "Delivered", right=True), under(header, row, "Failed", right=True)) == ("1", "1")
    assert under(header, row, "Last error") == "HTTP 400 bad payload"
    header, row = failures.split("\n")
    assert header.split() == ["Sink", "Dedup", "key", "State", "Attempts", "Error"]
    assert under(header, row, "Dedup key") == f"{DIVERGED}/failed" and under(header, row, "Error").startswith("HTTP")
    assert "None" not in out
    code, out, _ = cli(capsys, "alerts", "status", "--json")
    assert code == 1 and json.loads(out)["sinks"][0]["oldest_pending_seconds"] is None


def test_dead_letters_list_is_a_table(home, capsys):
    code, out, _ = cli(capsys, "dead-letters", "list")
    header, *rows = out.rstrip("\n").split("\n")
    assert code == 0 and header.split() == ["Time", "(UTC)", "Topic", "Partition", "Offset", "Reason", "Replayed"]
    (row,) = rows
    assert TIME.fullmatch(under(header, row, "Time (UTC)"))
    assert under(header, row, "Topic") == home.topic(EVENTS)
    assert under(header, row, "Reason").startswith("CorruptPayloadError")
    assert under(header, row, "Replayed") == "-" and "None" not in out


def test_alerts_silence_names_its_run_by_prefix_or_name_and_silences_is_a_table(home, capsys):
    for name in (DIVERGED[:8], "diverged"):
        code, out, err = cli(capsys, "alerts", "silence", "--run", name, "--for", "2h", "--reason", "noisy", "--json")
        assert code == 0, err
        assert json.loads(out)["run_id"] == DIVERGED
    code, out, err = cli(capsys, "alerts", "silence", "--run", "twin", "--for", "2h", "--reason", "r")
    assert code == 7 and out == "" and TWIN_A in err and TWIN_B in err
    code, out, _ = cli(capsys, "alerts", "silence", "--run", "no-such-run", "--for", "2h", "--reason", "r", "--json")
    assert code == 6 and json.loads(out)["exit_code"] == 6

    code, out, _ = cli(capsys, "alerts", "silences")
    header, *rows = out.rstrip("\n").split("\n")
    assert code == 0 and header.split() == ["Id", "Status", "Matchers", "Ends", "By", "Reason"] and len(rows) == 2
    for row in rows:
        assert under(header, row, "Status") == "active" and under(header, row, "Matchers") == f"run={DIVERGED}"
        assert TIME.fullmatch(under(header, row, "Ends")) and under(header, row, "Reason") == "noisy"
    assert "None" not in out


def test_audit_log_is_a_table_and_takes_a_run_by_prefix_or_name(home, capsys):
    assert cli(capsys, "gates", "diverged")[0] == 2  # something of the diverged run's in the log
    code, out, _ = cli(capsys, "audit", "log")
    header, *rows = out.rstrip("\n").split("\n")
    assert code == 0 and header.split() == ["Seq", "Time", "(UTC)", "Actor", "Action", "Run", "id", "Details"]
    assert rows and all(TIME.fullmatch(under(header, row, "Time (UTC)")) for row in rows)
    assert "gates.evaluated" in [under(header, row, "Action") for row in rows] and "None" not in out
    for name in (DIVERGED[:8], "diverged"):
        code, out, _ = cli(capsys, "audit", "log", "--run", name)
        header, *rows = out.rstrip("\n").split("\n")
        assert code == 0 and rows and {under(header, row, "Run id") for row in rows} == {DIVERGED}
    assert cli(capsys, "audit", "log", "--run", "twin")[0] == 7
    assert cli(capsys, "audit", "log", "--run", "no-such-run")[0] == 6


def test_audit_record_and_export_take_a_run_by_prefix_or_name_and_a_missing_stage_is_null(home, capsys, tmp_path):
    code, out, err = cli(capsys, "audit", DIVERGED[:8], "--json")
    record = json.loads(out)
    assert code == 0, err
    assert record["run_id"] == DIVERGED and record["registry_stage"] is None and '"None"' not in out
    code, out, _ = cli(capsys, "audit", "diverged")
    assert code == 0 and re.search(r"\nregistry_stage +none yet\n", out) and "None" not in out
    code, out, err = cli(capsys, "audit", "twin", "--json")
    assert code == 7 and sorted(c["run_id"] for c in json.loads(out)["candidates"]) == [TWIN_A, TWIN_B]
    assert cli(capsys, "audit", "no-such-run")[0] == 6

    bundle = tmp_path / "bundle.json"
    code, out, err = cli(capsys, "audit", "export", "diverged", "--out", str(bundle), "--json")
    assert code == 0, err
    assert json.loads(out)["run_id"] == DIVERGED and json.loads(bundle.read_text())["record"]["run_id"] == DIVERGED
    assert cli(capsys, "audit", "export", "7c0f", "--out", str(tmp_path / "twin.json"))[0] == 7
    assert not (tmp_path / "twin.json").exists()


def test_registry_history_times_read_as_the_tables_do(home, capsys):
    code, _, err = cli(capsys, "registry", "request", TWIN_A[:8])  # no stage yet: Staging is not next
    assert code == 2 and "no stage → Staging refused" in err and "None" not in err
    code, out, err = cli(capsys, "registry", "archive", TWIN_A[:8], "--reason", "superseded")
    assert code == 0 and "none → Archived" in out, err
    code, out, _ = cli(capsys, "registry", "status", TWIN_A[:8])
    history = out.rstrip("\n").split("\n")[1:]
    assert code == 0 and history and all(TIME.fullmatch(line.split("  ")[1]) for line in history)
    assert "T" not in "".join(line[:24] for line in history) and "None" not in out


@pytest.mark.parametrize("command", [["alerts", "silences"], ["dead-letters", "list"], ["audit", "log"]])
def test_a_failing_up_api_is_one_line_and_json_under_json(tmp_path, monkeypatch, capsys, command):
    """A `trainwire up` that owns the store but no longer answers: what the command says is one line."""
    for key in [k for k in os.environ if k.startswith("TRAINWIRE_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("TRAINWIRE_HOME", str(tmp_path))
    (tmp_path / "up.json").write_text(json.dumps({"pid": os.getpid(), "api": "http://127.0.0.1:9/"}))
    code, out, err = cli(capsys, *command, "--json")
    assert code == 1 and err == "" and json.loads(out)["exit_code"] == 1
    code, out, err = cli(capsys, *command)
    assert code == 1 and out == "" and err.startswith("trainwire: error: ") and err.count("\n") == 1


def test_an_empty_audit_log_verifies_without_a_none(tmp_path, monkeypatch, capsys):
    for key in [k for k in os.environ if k.startswith("TRAINWIRE_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("TRAINWIRE_HOME", str(tmp_path / "empty"))
    code, out, _ = cli(capsys, "audit", "verify")
    assert code == 0 and "0 entries, no head yet" in out and "None" not in out  # (verifying appends an entry)
