"""How the CLI prints values and names runs, without a store: tables, JSON, run lookup."""

import json
import math
from datetime import datetime, timezone

import pytest

from trainwire.cli_output import cell, column, json_text, table
from trainwire.cli_runs import EXIT_AMBIGUOUS_RUN, EXIT_NO_SUCH_RUN, RunLookupError, match_run

STARTED = datetime(2025, 6, 1, 12, 0, tzinfo=timezone.utc)
RUNS = [{"run_id": "abcd1234-0000", "run_name": "sft", "started_at": STARTED},
        {"run_id": "abcd9876-0000", "run_name": "sft-2", "started_at": STARTED},
        {"run_id": "ffff0000-0000", "run_name": "abcd", "started_at": STARTED}]


def test_json_spells_non_finite_numbers_as_strings_and_missing_values_as_null():
    text = json_text({"loss": math.nan, "up": math.inf, "down": -math.inf, "stage": None, "at": STARTED})
    assert json.loads(text) == {"loss": "NaN", "up": "Infinity", "down": "-Infinity", "stage": None,
                                "at": "2025-06-01T12:00:00+00:00"}


def test_table_cells_never_read_none_and_escape_control_characters():
    rows = [{"name": "a\x1b[31mb\nc", "loss": math.nan, "step": None}, {"name": "long name", "loss": 0.123456,
                                                                         "step": 7}]
    out = table(rows, (column("Name"), column("Loss", right=True), column("Step", right=True)), "none")
    assert out.split("\n") == ["Name             Loss  Step",
                               "a\\x1b[31mb\\nc     NaN     -",
                               "long name      0.1235     7"]
    assert table([], (column("Name"),), "no rows") == "no rows"
    assert cell(None) == cell("") == "-" and cell(-math.inf) == "-Infinity"


@pytest.mark.parametrize("text, run_id", [("abcd1234-0000", "abcd1234-0000"), ("abcd12", "abcd1234-0000"),
                                          ("ABCD9", "abcd9876-0000"), ("sft", "abcd1234-0000"),
                                          ("ffff", "ffff0000-0000")])
def test_a_run_is_named_by_its_id_a_unique_prefix_or_its_name(text, run_id):
    assert match_run(RUNS, text) == run_id


def test_a_prefix_or_name_that_fits_several_runs_is_refused_with_them():
    with pytest.raises(RunLookupError) as refused:
        match_run(RUNS, "abcd")  # two ids start with it, and it is a third run's name
    assert refused.value.exit_code == EXIT_AMBIGUOUS_RUN
    assert [c["run_id"] for c in refused.value.candidates] == [r["run_id"] for r in RUNS]
    with pytest.raises(RunLookupError) as short:
        match_run(RUNS, "abc")  # too short to be a prefix
    assert short.value.exit_code == EXIT_NO_SUCH_RUN and "at least 4 characters" in str(short.value)
