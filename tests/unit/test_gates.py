"""Quality gates G1–G6 on crafted runs: every outcome, and the edge cases that must not crash or mislead."""

import math

import pytest

from trainwire.consumers.governance.audit import build_audit_record, missing_from_audit
from trainwire.consumers.governance.gates import (
    EvalPoint, GatePolicy, RunEvidence, evaluate, g4_baseline, metric_direction, task_metrics,
)

H = "sha256:" + "ab" * 32


def complete_audit(**changes):
    """An audit record G6 accepts, built from the rows the store would hold; `changes` edit run started."""
    started = {"run_id": "r1", "experiment": "sft", "ts": None, "base_model": "llama-3-8b",
               "base_model_revision": "abc123", "dataset_path": "data/train.jsonl", "dataset_sha256": H,
               "config_file": "train.yaml", "config_sha256": H, "git_commit": "deadbeef", "git_dirty": False,
               "hyperparameters_json": '{"learning_rate": 0.0002}', "seed": 42,
               "environment": {"python": "3.11.9", "torch": "2.3.0"}, "host": "node-1"} | changes
    ended = {"status": "completed", "ts": None, "completed_steps": 100,
             "artifacts": [("adapter_model.safetensors", 1024, H), ("adapter_config.json", 300, H)]}
    record = build_audit_record(started, ended, [], {})
    record["training_record"]["ended_at"] = "2024-05-01T12:00:00.000Z"
    return record


def run(losses, evals=(), audit="complete", **kwargs):
    return RunEvidence("r1", list(enumerate(losses, 1)), list(evals),
                       audit=complete_audit() if audit == "complete" else audit, **kwargs)


def converging(n=10, start=2.0, end=0.5):
    return [start + (end - start) * i / (n - 1) for i in range(n)]


def statuses(report):
    return {g.gate: g.status for g in report.gates}


def test_a_healthy_run_passes_every_gate():
    report = evaluate(run(converging(), [EvalPoint(10, eval_loss=0.55, metrics={"f1": 0.9})]))
    assert report.overall == "passed"
    assert statuses(report) == {"G1": "passed", "G2": "passed", "G3": "passed", "G4": "no_baseline",
                                "G5": "passed", "G6": "passed"}


def test_nan_loss_blocks_and_names_the_step():
    losses = converging()
    losses[6] = math.nan
    report = evaluate(run(losses))
    assert report.overall == "blocked"
    g1 = report.gate("G1")
    assert g1.status == "failed" and "step 7" in g1.message


def test_infinite_final_loss_blocks():
    report = evaluate(run(converging(), final_loss=math.inf))
    assert report.gate("G1").status == "failed" and report.overall == "blocked"


def test_loss_that_did_not_fall_is_a_warning_only():
    report = evaluate(run([1.0, 1.2, 1.5]))
    assert report.gate("G2").status == "failed" and "did not fall" in report.gate("G2").message
    assert report.overall == "warnings"


def test_zero_initial_loss_is_compared_without_dividing():
    report = evaluate(run([0.0, 0.3]))
    assert report.gate("G2").status == "failed"
    assert report.gate("G2").details == {"initial_loss": 0.0, "final_loss": 0.3}
    assert evaluate(run([0.0, -0.1])).gate("G2").status == "passed"


def test_run_ended_summary_is_preferred_over_logged_losses():
    # losses logged every 10 steps miss the true first/last; the producer's summary has them
    report = evaluate(run([2.0, 1.9], initial_loss=2.5, final_loss=1.0))
    assert report.gate("G2").details == {"initial_loss": 2.5, "final_loss": 1.0}


def test_eval_far_above_train_warns_on_generalisation():
    report = evaluate(run(converging(), [EvalPoint(10, eval_loss=0.5 * 1.25)]))
    g3 = report.gate("G3")
    assert g3.status == "failed" and g3.details["ratio"] == pytest.approx(1.25)
    assert report.overall == "warnings"


def test_generalisation_uses_the_train_loss_at_the_eval_step():
    losses = [2.0, 1.0, 0.5, 0.1]
    report = evaluate(run(losses, [EvalPoint(2, eval_loss=1.1)]))
    assert report.gate("G3").details["train_loss"] == 1.0 and report.gate("G3").status == "passed"


def test_missing_eval_and_missing_losses_say_so_and_do_not_fail():
    report = evaluate(run([]))
    assert statuses(report)["G1"] == statuses(report)["G2"] == statuses(report)["G3"] == "no_data"
    assert report.gate("G3").message == "no eval loss logged"
    assert report.gate("G5").status == "no_data"
    assert report.overall == "passed"


def test_zero_train_loss_gives_an_infinite_ratio_not_a_crash():
    report = evaluate(run([1.0, 0.0], [EvalPoint(2, eval_loss=0.2)]))
    assert report.gate("G3").status == "failed" and report.gate("G3").details["ratio"] == math.inf


def test_no_baseline_passes_informationally():
    g4 = g4_baseline({"eval_loss": 9.0}, None, GatePolicy())
    assert g4.status == "no_baseline" and not g4.failed and "no baseline" in g4.message


@pytest.mark.parametrize("value, status", [(0.96, "passed"), (0.95, "passed"), (0.94, "failed")])
def test_baseline_higher_is_better_needs_95_percent(value, status):
    assert g4_baseline({"eval_accuracy": value}, {"eval_accuracy": 1.0}, GatePolicy()).status == status


@pytest.mark.parametrize("value, status", [(1.04, "passed"), (1.0 / 0.95, "passed"), (1.06, "failed"),
                                           (0.5, "passed")])
def test_baseline_lower_is_better_allows_baseline_over_095(value, status):
    assert g4_baseline({"eval_loss": value}, {"eval_loss": 1.0}, GatePolicy()).status == status


def test_baseline_failure_blocks_the_run():
    report = evaluate(run(converging(), [EvalPoint(10, eval_loss=0.52)]), {"eval_loss": 0.4})
    g4 = report.gate("G4")
    assert g4.status == "failed" and g4.details["metric"] == "eval_loss" and not g4.details["higher_is_better"]
    assert report.overall == "blocked"


def test_baseline_metric_direction_can_be_given_for_custom_metrics():
    assert g4_baseline({"reward": 0.9}, {"reward": 1.0}, GatePolicy(), "reward:higher").status == "failed"
    assert g4_baseline({"reward": 0.9}, {"reward": 1.0}, GatePolicy(), "reward:lower").status == "passed"
    with pytest.raises(ValueError, match="reward.*unknown direction"):
        metric_direction("reward")


def test_a_diverged_baseline_is_nothing_to_compare_with():
    g4 = g4_baseline({"eval_loss": 1.0}, {"eval_loss": math.nan}, GatePolicy())
    assert g4.status == "no_data" and not g4.failed


def test_baseline_without_the_metric_says_which_side_lacks_it():
    g4 = g4_baseline({"eval_loss": 1.0}, {"eval_accuracy": 0.8}, GatePolicy(), "eval_loss")
    assert g4.status == "no_data" and g4.message == "eval_loss not in the baseline"


@pytest.mark.parametrize("metrics, failed", [
    ({"exact_match": 0.85, "f1": 0.9}, []),
    ({"exact_match": 0.8}, ["exact_match"]),  # strictly greater than 0.8
    ({"eval_rougeL": 0.25, "rouge1": 0.4}, ["rougeL"]),
    ({"bleu": 0.2}, ["bleu"]),
    ({"human_eval": 3.4}, ["human_eval"]),
    ({"f1": 85.0}, []),  # a percentage, as HF evaluate's squad metric reports it
])
def test_task_quality_thresholds(metrics, failed):
    report = evaluate(run(converging(), [EvalPoint(10, eval_loss=0.55, metrics=metrics)]))
    g5 = report.gate("G5")
    assert [name for name, check in g5.details.items() if check["status"] == "failed"] == failed
    assert g5.status == ("failed" if failed else "passed")
    assert report.overall == ("warnings" if failed else "passed")


def test_mmlu_is_judged_against_the_baseline():
    evals = [EvalPoint(10, eval_loss=0.55, metrics={"mmlu": 0.62})]
    assert evaluate(run(converging(), evals)).gate("G5").details["mmlu"]["status"] == "no_baseline"
    assert evaluate(run(converging(), evals), {"mmlu": 0.60}).gate("G5").status == "passed"
    assert evaluate(run(converging(), evals), {"mmlu": 0.65}).gate("G5").status == "failed"


def test_latest_task_metric_value_counts():
    evals = [EvalPoint(5, metrics={"f1": 0.5}), EvalPoint(10, metrics={"f1": 0.9})]
    assert task_metrics(run(converging(), evals).final_metrics()) == {"f1": 0.9}


def test_incomplete_audit_record_blocks_and_names_what_is_missing():
    audit = complete_audit(dataset_sha256=None, git_dirty=True, seed=None)
    report = evaluate(run(converging(), audit=audit))
    g6 = report.gate("G6")
    assert report.overall == "blocked" and g6.status == "failed"
    assert g6.details["missing"] == [
        "input_artifacts.dataset.sha256 (not computed)",
        "input_artifacts.config.git_dirty (uncommitted changes: config not versioned)",
        "reproducibility.seeds.seed",
    ]


def test_audit_record_without_outputs_or_end_is_incomplete():
    started = {"run_id": "r1", "experiment": "sft", "base_model": "m", "base_model_sha256": "md5:123"}
    record = build_audit_record(started, None, [], {})
    missing = missing_from_audit(record)
    assert "training_record.ended_at (no run ended event)" in missing
    assert "output_artifacts.artifacts (no output artifacts recorded)" in missing
    assert "input_artifacts.base_model.sha256 (not sha256:<hex>: 'md5:123')" in missing


def test_placeholders_do_not_pass_for_an_audit_record():
    """What a tokenised split's `datasets` metadata says (builder `json`, version `0.0.0`) and a run that recorded
    no hardware look complete but tell an auditor nothing."""
    audit = complete_audit(dataset_path=None, dataset_source="json", dataset_version="0.0.0", host="")
    g6 = evaluate(run(converging(), audit=audit)).gate("G6")
    assert g6.status == "failed"
    assert g6.details["missing"] == [
        "input_artifacts.dataset.source ('json' is the datasets builder that read the files, not where the data "
        "came from)",
        "input_artifacts.dataset.version ('0.0.0' is a placeholder, not a version)",
        "reproducibility.hardware (no GPU, world size or host recorded)",
    ]
    assert "'json' is the datasets builder" in g6.message
    named = complete_audit(dataset_path=None, dataset_source="hf://tatsu-lab/alpaca", dataset_version="2024-05-01")
    assert evaluate(run(converging(), audit=named)).gate("G6").status == "passed"


def test_no_audit_record_blocks():
    assert evaluate(run(converging(), audit=None)).gate("G6").status == "failed"


def test_messages_about_a_diverged_run_round_its_losses():
    losses = [3.023711957473435, 2.718281828459045, math.nan]
    report = evaluate(run(losses, [EvalPoint(3, eval_loss=math.nan)]))
    assert report.gate("G2").message == "loss not finite (initial 3.024, final nan)"
    assert report.gate("G3").message == "loss not finite at step 3 (eval nan, train nan)"
    assert report.gate("G2").details["initial_loss"] == 3.023711957473435  # the record keeps the full value
