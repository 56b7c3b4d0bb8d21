"""The CLI as a person meets it (issue 17, item 5): tables with headers and aligned columns, a run named by id
prefix or name (an ambiguous one refused with the candidates), `run` showing open alerts and gates, one JSON
spelling of NaN and of missing values, and exit codes that say what happened.

Real local log, real ingest (detectors, run-end gates), real embedded ClickHouse; the CLI through `main`.
"""

import json

import pytest

from tests.cli_home import DIVERGED, TWIN_A, TWIN_B, cli, three_runs_home
from trainwire.cli import main


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    with three_runs_home(tmp_path_factory.mktemp("cli"), steps=60) as settings:
        yield settings


def test_runs_is_a_table_with_a_header_and_aligned_columns(home, capsys):
    code, out, _ = cli(capsys, "runs")
    header, *rows = out.rstrip("\n").split("\n")
    assert code == 0 and header.split() == ["Run", "id", "Experiment", "Name", "Status", "Started", "Step",
                                            "Final", "loss", "Firing"]
    assert len(rows) == 3
    name_at, status_at = header.index("Name"), header.index("Status")
    by_id = {row.split()[0]: row for row in rows}
    assert by_id[DIVERGED][name_at:].startswith("diverged ") and by_id[TWIN_A][name_at:].startswith("twin ")
    assert all(row[status_at:].split()[0] in ("completed", "stopped", "failed") for row in rows)
    final_loss_end = header.index("Final loss") + len("Final loss")
    assert by_id[DIVERGED][:final_loss_end].endswith("NaN")  # right-aligned under its header
    assert "None" not in out


@pytest.mark.parametrize("name", [DIVERGED, DIVERGED[:8], DIVERGED[:4].upper(), "diverged"])
def test_run_is_named_by_id_prefix_or_name_and_shows_its_open_alerts_and_gates(home, capsys, name):
    code, out, err = cli(capsys, "run", name)
    assert code == 0, err
    assert DIVERGED in out and "\nopen alerts:\n" in out and "gates: BLOCKED" in out
    alerts = out.split("open alerts:\n")[1]
    assert alerts.split("\n")[0].split() == ["Severity", "Rule", "Step", "Fired", "Message"]
    assert "loss_not_finite" in alerts and "G1" in out.split("gates: BLOCKED")[1]
    assert "None" not in out

    code, out, _ = cli(capsys, "run", name, "--json")
    summary = json.loads(out)
    assert code == 0 and summary["run_id"] == DIVERGED and summary["final_loss"] == "NaN"
    assert "loss_not_finite" in [a["rule"] for a in summary["open_alerts"]]
    assert summary["gates"]["overall"] == "blocked" and summary["gates"]["gates"][0]["status"] == "failed"
    assert '"None"' not in out and "NaN," not in out.replace('"NaN",', "")  # NaN only ever as the string "NaN"


def test_an_ambiguous_name_or_prefix_is_refused_with_the_candidates(home, capsys):
    for ambiguous in ("twin", "7c0f"):
        code, out, err = cli(capsys, "run", ambiguous)
        assert code == 7 and out == ""
        assert "names 2 runs" in err and TWIN_A in err and TWIN_B in err and "Run id" in err
    code, out, _ = cli(capsys, "gates", "twin", "--json")
    refusal = json.loads(out)
    assert code == 7 and refusal["exit_code"] == 7
    assert sorted(c["run_id"] for c in refusal["candidates"]) == [TWIN_A, TWIN_B]
    assert {c["run_name"] for c in refusal["candidates"]} == {"twin"} and all(c["started_at"]
                                                                             for c in refusal["candidates"])
    code, out, _ = cli(capsys, "run", TWIN_A[:8])  # a longer prefix is unique
    assert code == 0 and TWIN_A in out


def test_gates_exit_codes_are_outcomes_and_errors_have_codes_of_their_own(home, capsys):
    code, out, _ = cli(capsys, "gates", DIVERGED[:8], "--json")
    result = json.loads(out)
    assert code == 2 and result["overall"] == "blocked"
    assert result["stage"] is None  # not yet in the registry: null, never the string "None"
    code, out, _ = cli(capsys, "gates", "diverged")
    assert code == 2 and out.split("\n")[1].split() == ["Gate", "Name", "On", "fail", "Status", "Message"]

    code, _, err = cli(capsys, "gates", "no-such-run")
    assert code == 6 and err.count("\n") == 1 and "no run 'no-such-run' in the store" in err
    code, _, err = cli(capsys, "gates", "diverged", "--baseline", "no-such-run")
    assert code == 6 and "--baseline: no run 'no-such-run'" in err
    code, _, err = cli(capsys, "gates", "diverged", "--metric", "reward:sideways")
    assert code == 8 and err.count("\n") == 1
    with pytest.raises(SystemExit) as exited:  # no RUN at all: argparse's usage error, not "blocked"
        main(["gates"])
    assert exited.value.code == 8


def test_unknown_run_exits_6_for_every_command_that_names_one(home, capsys):
    code, out, err = cli(capsys, "run", "no-such-run")
    assert code == 6 and out == "" and err.count("\n") == 1
    code, out, _ = cli(capsys, "run", "no-such-run", "--json")
    assert code == 6 and json.loads(out)["exit_code"] == 6


def test_registry_names_runs_like_every_command_and_lists_them_as_a_table(home, capsys):
    code, out, _ = cli(capsys, "registry", "status", "diverged", "--json")
    assert code == 0 and json.loads(out)["run_id"] == DIVERGED and json.loads(out)["stage"] is None
    code, out, err = cli(capsys, "registry", "status", "twin")
    assert code == 7 and TWIN_A in err
    code, out, _ = cli(capsys, "registry", "status")
    assert code == 0 and "None" not in out
