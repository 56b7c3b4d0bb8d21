"""The public read API for notebooks (issue 18): `trainwire.read` answers what the CLI answers, filters runs, names a
run as the CLI does, keeps NaN, returns pandas or Arrow, reads the same through `trainwire up`'s Arrow route (token
required), and `trainwire export` writes files that read back equal.

Real local log, real ingest (detectors, run-end gates, the registry's automatic Candidate), real embedded ClickHouse.
"""

import json
import math
import urllib.request
from datetime import timedelta

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from beside_up import running_up

import trainwire.read as tw
from tests.cli_home import DIVERGED, TWIN_A, TWIN_B, cli, three_runs_home
from trainwire.cli_output import json_text
from trainwire.infra.store import connect_store
from trainwire.infra.store.api import ARROW_STREAM, ReadApiServer, RemoteReader
from trainwire.infra.store.read import StoreReader
from trainwire.producers import init
from trainwire.producers.simulate import JobPlan, run_job, simulated_artifacts, simulated_lineage

GOOD = "600dbeef-0000-4000-8000-000000000004"
CUSTOM = "c0570000-0000-4000-8000-000000000005"
ROLLED_BACK = "0b0b0000-0000-4000-8000-000000000006"
ROLLED_BACK_STEPS = [1, 2, 3, 4, 5, 3, 4]  # restarted from the checkpoint at step 2
CUSTOM_STEPS = 40
CLI_RUN_COLUMNS = ["run_id", "experiment", "run_name", "team", "host", "started_at", "status", "ended_at",
                   "total_steps", "last_step", "steps_logged", "last_event_at", "final_loss", "firing_alerts"]


def more_runs(settings):
    """A run with the lineage its gates want (it passes and becomes a registry Candidate); one with tags, nested
    hyperparameters, a custom step metric, a task metric, GPU samples and checkpoints; one that went back to an
    earlier step."""
    good = init("tw-read", "good", {"learning_rate": 1e-4}, settings=settings, sample_gpus=False, run_id=GOOD,
                total_steps=120, **simulated_lineage(4))
    run_job(good, JobPlan(steps=120, seed=3))
    good.finish("completed", artifacts=simulated_artifacts(GOOD, 120))

    custom = init("tw-read", "custom", {"learning_rate": 1e-4, "lora": {"r": 16, "alpha": 32}}, settings=settings,
                  sample_gpus=False, run_id=CUSTOM, total_steps=CUSTOM_STEPS,
                  tags={"purpose": "baseline", "dataset": "alpaca"})
    for step in range(1, CUSTOM_STEPS + 1):
        custom.log_step(step, loss=2.0 * math.exp(-step / 20) + 0.3, learning_rate=1e-4,
                        grad_norm=None if step % 4 == 0 else 1.0, tokens_per_s=3000.0, mfu=step / 100)
        if step % 20 == 0:
            custom.log_eval(step, eval_loss=0.6, eval_accuracy=0.7, mmlu=0.41)
            custom.log_checkpoint(step, f"/ckpt/checkpoint-{step}", files=simulated_artifacts(CUSTOM, step))
        if step % 10 == 0:
            custom.log_gpu(gpu_index=0, gpu_uuid="GPU-0", gpu_name="A100", utilization_pct=90.0 + step / 10)
    custom.finish("completed")

    rolled_back = init("rollback", "rolled-back", settings=settings, sample_gpus=False, run_id=ROLLED_BACK)
    for logged, step in enumerate(ROLLED_BACK_STEPS):
        rolled_back.log_step(step, loss=float(logged))
    rolled_back.finish("completed")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    with three_runs_home(tmp_path_factory.mktemp("read"), steps=60, before_ingest=more_runs) as settings:
        yield settings


@pytest.fixture
def store(home):
    with tw.connect(home=home.home) as store:
        yield store


def plain(value):
    """As the CLI's JSON spells it."""
    return json.loads(json_text(value))


def same(one, other) -> bool:
    """Equal tables, types and values, a NaN equal to a NaN (`Table.equals` holds it unequal to itself) and never
    to a NULL."""
    return one.schema.equals(other.schema) and plain(one.to_pylist()) == plain(other.to_pylist())


# --- Answers equal the CLI's ----------------------------------------------------------------------------------


def test_runs_answer_what_trainwire_runs_json_answers(home, store, capsys):
    code, out, _ = cli(capsys, "runs", "--json")
    listed = store.runs(as_arrow=True)
    assert code == 0 and store.via == "embedded"
    assert plain(listed.select(CLI_RUN_COLUMNS).to_pylist()) == json.loads(out)
    assert listed.num_rows == 6 and listed.column("run_id")[0].as_py() == ROLLED_BACK  # newest first


@pytest.mark.parametrize("name", [DIVERGED, DIVERGED[:4].lower(), "good", CUSTOM[:8]])
def test_run_answers_what_trainwire_run_json_answers(home, store, capsys, name):
    code, out, _ = cli(capsys, "run", name, "--json")
    answer = json.loads(out)
    run = store.run(name)
    assert code == 0 and plain({key: run[key] for key in answer}) == answer
    assert set(run) - set(answer) == {"host", "user", "tags", "params", "stage"}


def test_run_adds_its_tags_params_and_registry_stage(store):
    custom, good = store.run("custom"), store.run(GOOD)
    assert custom["tags"] == {"purpose": "baseline", "dataset": "alpaca"}
    assert custom["params"] == {"learning_rate": 1e-4, "lora": {"r": 16, "alpha": 32}}
    assert good["gates"]["overall"] == "passed" and good["stage"] == "Candidate" and custom["stage"] is None
    assert good["started_at"].utcoffset() == timedelta(0)  # timezone-aware UTC


# --- Filters ----------------------------------------------------------------------------------------------------


def ids(frame):
    return set(frame["run_id"])


def test_runs_filter_by_experiment_status_team_and_time(store):
    assert ids(store.runs(experiment="cli-sft")) == {DIVERGED, TWIN_A, TWIN_B}
    assert ids(store.runs(experiment=["tw-read", "nope"])) == {GOOD, CUSTOM}
    assert ids(store.runs(status="completed")) == {DIVERGED, TWIN_A, TWIN_B, GOOD, CUSTOM, ROLLED_BACK}
    assert ids(store.runs(status=["running", "failed"])) == set()
    assert ids(store.runs(team="nobody")) == set()
    everything = store.runs()
    good_start = everything.set_index("run_id").loc[GOOD, "started_at"]
    assert ids(store.runs(since=good_start)) == {GOOD, CUSTOM, ROLLED_BACK}
    assert ids(store.runs(until=good_start.isoformat(), since=good_start.to_pydatetime())) == {GOOD}


def test_runs_filter_by_tags_and_hyperparameters_named_as_mlflow_names_them(store):
    tagged = store.runs(tags={"purpose": "baseline"})
    assert ids(tagged) == {CUSTOM} and tagged["tags.dataset"].tolist() == ["alpaca"]
    assert ids(store.runs(tags={"purpose": "baseline", "dataset": "other"})) == set()
    assert ids(store.runs(params={"lora.r": 16})) == {CUSTOM}
    assert ids(store.runs(params={"learning_rate": 2e-4})) == {DIVERGED, TWIN_A, TWIN_B}
    assert ids(store.runs(params={"learning_rate": {1e-4, 3e-4}})) == {GOOD, CUSTOM}
    assert ids(store.runs(params={"lora.r": 8})) == set()
    frame = store.runs().set_index("run_id")
    assert frame.loc[CUSTOM, "params.lora.alpha"] == 32 and frame.loc[GOOD, "params.learning_rate"] == 1e-4
    assert math.isnan(frame.loc[GOOD, "params.lora.alpha"])  # a run without it: missing, not zero


def test_runs_filter_by_gate_outcome_and_registry_stage(store):
    assert ids(store.runs(gate="passed")) == {GOOD}
    assert DIVERGED in ids(store.runs(gate="blocked")) and GOOD not in ids(store.runs(gate="blocked"))
    assert ids(store.runs(stage="Candidate")) == {GOOD}
    assert ids(store.runs(stage=["Staging", "Production"])) == set()
    assert store.runs().set_index("run_id").loc[GOOD, ["gate", "stage"]].tolist() == ["passed", "Candidate"]


# --- Naming a run -------------------------------------------------------------------------------------------------


def test_a_run_is_named_as_the_cli_names_it_and_refused_in_the_cli_s_words(store, capsys):
    assert store.resolve("diverged") == store.resolve(DIVERGED[:6].upper()) == DIVERGED
    with pytest.raises(tw.AmbiguousRunError) as ambiguous:
        store.steps("twin")
    assert {c["run_id"] for c in ambiguous.value.candidates} == {TWIN_A, TWIN_B}
    code, _, err = cli(capsys, "run", "twin")
    assert code == ambiguous.value.exit_code == 7 and f"error: {ambiguous.value}\n" in err
    with pytest.raises(tw.UnknownRunError) as unknown:
        store.run("no-such-run")
    code, _, err = cli(capsys, "run", "no-such-run")
    assert code == unknown.value.exit_code == 6 and f"error: {unknown.value}\n" in err
    with pytest.raises(tw.UnknownRunError, match="at least 4 characters"):
        store.run(DIVERGED[:3])


# --- Series -------------------------------------------------------------------------------------------------------


def stored(home, sql):
    client = connect_store(home.store_dsn)
    try:
        return client.query(sql).result_rows[0]
    finally:
        client.close()


def test_steps_are_every_step_at_full_resolution_with_nan_kept(home, store):
    steps = store.steps("diverged")
    nan_losses, logged = stored(home, f"SELECT countIf(isNaN(loss)), count() FROM steps FINAL "
                                      f"WHERE run_id = '{DIVERGED}'")
    assert nan_losses > 0 and len(steps) == logged == 60
    assert steps["loss"].isna().sum() == nan_losses and steps["step"].tolist() == list(range(1, 61))
    assert str(steps["ts"].dtype) == "datetime64[ms, UTC]"
    assert list(steps.columns[:4]) == ["step", "ts", "epoch", "loss"]
    assert "samples_per_s" not in steps.columns  # never logged: asked for by name, it is there, every row NULL
    assert store.steps("diverged", ["samples_per_s"], as_arrow=True).column("samples_per_s").null_count == 60


def test_arrow_keeps_nan_apart_from_a_value_never_logged(store):
    table = store.steps("custom", ["loss", "grad_norm", "mfu"], as_arrow=True)
    assert table.column_names == ["step", "ts", "loss", "grad_norm", "mfu"]
    assert table.schema.field("ts").type == pa.timestamp("ms", "UTC")
    assert table.column("grad_norm").null_count == CUSTOM_STEPS // 4  # not logged: NULL, not NaN
    assert table.column("mfu").to_pylist()[:2] == [0.01, 0.02]  # a custom metric, by name
    nan = store.steps("diverged", ["loss"], as_arrow=True).column("loss")
    assert nan.null_count == 0 and any(math.isnan(v) for v in nan.to_pylist())
    assert store.steps("custom", ["loss"]).equals(store.steps("custom", ["loss"], as_arrow=True).to_pandas())


def test_steps_come_in_step_order_a_step_logged_twice_in_logging_order(store):
    steps = store.steps("rolled-back")
    assert steps["step"].tolist() == sorted(ROLLED_BACK_STEPS)
    assert steps["loss"].tolist() == [0.0, 1.0, 2.0, 5.0, 3.0, 6.0, 4.0]  # step 3 as first logged, then again
    history = store.history(["custom", "rolled-back"], ["loss"])
    assert history["run_id"].tolist() == [ROLLED_BACK] * len(ROLLED_BACK_STEPS) + [CUSTOM] * CUSTOM_STEPS
    assert history["step"].tolist() == [*sorted(ROLLED_BACK_STEPS), *range(1, CUSTOM_STEPS + 1)]  # by run, step


def test_every_and_max_points_downsample_on_request(store):
    full = store.steps("diverged", ["loss"])
    every = store.steps("diverged", ["loss"], every=10)
    assert every["step"].tolist() == [10, 20, 30, 40, 50, 60]
    assert every["loss"].equals(full.set_index("step").loc[every["step"], "loss"].reset_index(drop=True))
    buckets = store.steps("diverged", ["loss"], max_points=6)
    assert 1 <= len(buckets) <= 6 and buckets["steps"].sum() == 60
    assert buckets["loss_not_finite"].sum() == full["loss"].isna().sum()
    assert {"grad_norm", "learning_rate"}.isdisjoint(buckets.columns)


def test_history_is_many_runs_in_long_format(store):
    history = store.history(["diverged", "custom"], ["loss"])
    assert list(history.columns) == ["run_id", "step", "ts", "loss"]
    assert history.groupby("run_id").size().to_dict() == {DIVERGED: 60, CUSTOM: CUSTOM_STEPS}
    custom = history[history["run_id"] == CUSTOM].drop(columns="run_id").reset_index(drop=True)
    assert custom.equals(store.steps("custom", ["loss"]))
    with pytest.raises(ValueError, match="no metric 'lsos'.*loss"):
        store.history(["custom"], ["lsos"])


def test_evals_gpu_samples_alerts_and_checkpoints(store):
    evals = store.evals("custom")
    assert evals["step"].tolist() == [20, 40] and evals["mmlu"].tolist() == [0.41, 0.41]
    gpu = store.gpu_samples("custom")
    assert len(gpu) == 4 and gpu["utilization_pct"].tolist() == [91.0, 92.0, 93.0, 94.0]
    assert len(store.gpu_samples("custom", max_points=2)) <= 2
    alerts = store.alerts("diverged")
    assert "loss_not_finite" in set(alerts["rule"]) and set(alerts["state"]) == {"firing"}
    checkpoints = store.checkpoints("custom", as_arrow=True)
    assert checkpoints.column("path").to_pylist() == ["/ckpt/checkpoint-20", "/ckpt/checkpoint-40"]
    assert checkpoints.column("files").to_pylist()[0][0]["name"] == simulated_artifacts(CUSTOM, 20)[0]["name"]


# --- Through `trainwire up` ---------------------------------------------------------------------------------------


def series(store):
    """Every public call's Arrow answer, to compare two ways of reading one store."""
    return {"runs": store.runs(as_arrow=True), "run": plain(store.run("diverged")),
            "steps": store.steps("diverged", as_arrow=True), "custom": store.steps("custom", as_arrow=True),
            "buckets": store.steps("diverged", max_points=7, as_arrow=True),
            "history": store.history([DIVERGED, CUSTOM], ["loss", "mfu"], as_arrow=True),
            "evals": store.evals("custom", as_arrow=True), "gpu": store.gpu_samples("custom", as_arrow=True),
            "alerts": store.alerts("diverged", as_arrow=True),
            "checkpoints": store.checkpoints("custom", as_arrow=True)}


@pytest.fixture
def api(home, tmp_path):
    client = connect_store(home.store_dsn)
    server = ReadApiServer(StoreReader(client), tmp_path / "api-home").start()
    yield server
    server.stop()
    client.close()


def test_the_arrow_route_needs_the_token_and_answers_an_arrow_stream(api):
    url = f"{api.url}/arrow/steps_table?run_ids=" + urllib.request.quote(json.dumps([DIVERGED, CUSTOM]))
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=10)
    assert refused.value.code == 401
    wrong_host = urllib.request.Request(url, headers={"Authorization": f"Bearer {api.token}",
                                                      "Host": "evil.example"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(wrong_host, timeout=10)
    assert refused.value.code == 403
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {api.token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["Content-Type"] == ARROW_STREAM
        table = pa.ipc.open_stream(response.read()).read_all()
    assert table.num_rows == 60 + CUSTOM_STEPS and pa.types.is_dictionary(table.schema.field("run_id").type)
    assert table.column("run_id").to_pylist() == [DIVERGED] * 60 + [CUSTOM] * CUSTOM_STEPS


def test_the_arrow_route_answers_the_same_frames_as_in_process(home, store, api, tmp_path):
    remote = tw.Store(RemoteReader(api.url, tmp_path / "api-home"), via="up")
    here, there = series(store), series(remote)
    assert here.keys() == there.keys()
    for name in here:
        assert here[name] == there[name] if name == "run" else same(here[name], there[name]), name
    with pytest.raises(ValueError, match="no metric 'lsos'"):
        remote.steps("custom", ["lsos"])


def test_connect_reads_through_a_running_up_that_owns_the_store(home):
    with tw.connect(home=home.home) as store:
        before = series(store)
    with running_up(home.home):
        with tw.connect(home=home.home) as store:
            assert store.via == "up"
            through_up = series(store)
    for name in before:
        if name == "run":
            assert before[name] == through_up[name]
        elif name != "runs":  # `up` took over the store: its last-event times may move on, rows stay
            assert same(before[name], through_up[name]), name
    assert before["runs"].column("run_id").equals(through_up["runs"].column("run_id"))


# --- trainwire export ---------------------------------------------------------------------------------------------


def test_export_writes_parquet_that_reads_back_equal(store, capsys, tmp_path):
    code, out, _ = cli(capsys, "export", "diverged", CUSTOM[:8], "--out", str(tmp_path), "--json")
    files = json.loads(out)["files"]
    assert code == 0 and len(files) == 2 * len(tw.SERIES)
    for written in files:
        expected = getattr(store, written["series"])(written["run_id"], as_arrow=True)
        assert written["rows"] == expected.num_rows
        assert same(pq.read_table(written["path"]), expected), written["path"]
    assert json.loads((tmp_path / CUSTOM / "run.json").read_text())["run_name"] == "custom"


def test_export_writes_csv_that_reads_back_equal(store, capsys, tmp_path):
    code, out, _ = cli(capsys, "export", "custom", "diverged", "--format", "csv", "--out", str(tmp_path))
    assert code == 0 and f"{CUSTOM}  steps" in out and "10 files for 2 run(s)" in out
    for run_id in (CUSTOM, DIVERGED):
        for name in ("steps", "evals", "alerts"):
            expected = getattr(store, name)(run_id, as_arrow=True)
            read = pacsv.read_csv(tmp_path / run_id / f"{name}.csv", convert_options=pacsv.ConvertOptions(
                column_types=expected.schema, null_values=[""]))  # NaN is written `nan`, a NULL as nothing
            assert same(read.cast(expected.schema), expected), (run_id, name)  # CSV says nothing of "not null"
    files = pacsv.read_csv(tmp_path / CUSTOM / "checkpoints.csv").column("files").to_pylist()
    assert json.loads(files[0])[0]["name"] == simulated_artifacts(CUSTOM, 20)[0]["name"]


def test_export_exits_6_for_an_unknown_run_and_7_for_an_ambiguous_one_writing_nothing(home, capsys, tmp_path):
    code, _, err = cli(capsys, "export", "custom", "no-such-run", "--out", str(tmp_path))
    assert code == 6 and "no run 'no-such-run'" in err
    code, out, _ = cli(capsys, "export", "twin", "--out", str(tmp_path), "--json")
    assert code == 7 and json.loads(out)["exit_code"] == 7
    assert list(tmp_path.iterdir()) == []
