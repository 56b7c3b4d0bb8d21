"""The callback under a Trainer's defaults: a real tiny LoRA fine-tune with `TrainingArguments` left as they come
(only the run's length, batch, logging and saving cadence set), through the real ingest, detectors, alert consumer
and stop switch on the local log and chdb."""

import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from tests.integration.test_hf_callback import TokenDataset, run_ended, stored, tiny_lora_model  # noqa: E402
from tests.integration.test_stop_switch_end_to_end import (  # noqa: E402, F401 (pages is a fixture)
    RealisticStepTime, pages, stored_summary,
)
from trainwire.consumers.governance.audit import build_audit_record  # noqa: E402
from trainwire.producers import TrainwireCallback  # noqa: E402

POISONED_AT = 4  # the weights turn NaN at the end of this step: the loss of the next one is NaN


def default_args(tmp_path: Path, **cadence) -> transformers.TrainingArguments:
    """Default TrainingArguments but for what a test must set: where, how long, how big, how often; CPU."""
    return transformers.TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8,
                                          report_to=[], use_cpu=True, disable_tqdm=True, **cadence)


class PoisonWeights(transformers.TrainerCallback):
    """The input embeddings become NaN after step POISONED_AT, as in a run whose weights blew up."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == POISONED_AT:
            with torch.no_grad():
                model.get_input_embeddings().weight.fill_(math.nan)


@pytest.mark.slow
def test_a_fine_tune_that_diverges_under_default_arguments_is_caught_and_stopped(local_settings, pages, tmp_path):
    assert transformers.TrainingArguments(output_dir=str(tmp_path)).logging_nan_inf_filter  # the default
    callback = TrainwireCallback(experiment="nan-defaults", settings=local_settings, sample_gpus=False,
                                 stop_on_block=True)
    trainer = transformers.Trainer(model=tiny_lora_model(), args=default_args(tmp_path, max_steps=60, logging_steps=1),
                                   train_dataset=TokenDataset(64),
                                   callbacks=[callback, PoisonWeights(), RealisticStepTime()])
    trainer.train()

    stopped_at = trainer.state.global_step
    assert POISONED_AT < stopped_at <= POISONED_AT + 10, "training did not stop within a few steps of the NaN"
    final = tmp_path / "out" / f"checkpoint-{stopped_at}"
    assert (final / "adapter_model.safetensors").is_file()
    summary = stored_summary(local_settings, callback.run.run_id)
    assert summary["status"] == "stopped" and summary["error"].startswith("loss_not_finite: ")
    assert [c["path"] for c in summary["checkpoints_stored"]] == [str(final)]
    (page,) = [p for p in pages.bodies() if p["run_id"] == callback.run.run_id]
    assert (page["rule"], page["step"]) == ("loss_not_finite", POISONED_AT + 1)  # within one logging step

    reader, client = stored(local_settings)
    losses = {s["step"]: s["loss"] for s in reader.steps(callback.run.run_id)}
    assert all(math.isfinite(losses[step]) for step in range(1, POISONED_AT + 1))
    assert math.isnan(losses[POISONED_AT + 1])  # the true value, not the filter's stand-in
    hyperparameters = json.loads(reader.run_started(callback.run.run_id)["hyperparameters_json"])
    assert hyperparameters["logging_nan_inf_filter"] is False  # what the run ran with, as recorded


class PaddedTokenDataset(TokenDataset):
    """Rows of 16 token ids whose last 4 are padding (attention mask 0): 12 real tokens a row."""

    def __getitem__(self, i):
        row = super().__getitem__(i)
        row["attention_mask"] = torch.tensor([1] * 12 + [0] * 4)
        return row


@pytest.mark.slow
def test_throughput_is_recorded_under_default_arguments(local_settings, tmp_path):
    args = default_args(tmp_path, max_steps=6, logging_steps=2, save_strategy="no")
    assert args.include_num_input_tokens_seen in ("no", False)  # the Trainer counts no tokens by default
    callback = TrainwireCallback(experiment="tokens-defaults", settings=local_settings, sample_gpus=False)
    transformers.Trainer(model=tiny_lora_model(), args=args, train_dataset=PaddedTokenDataset(64),
                         callbacks=[callback]).train()

    reader, client = stored(local_settings)
    steps = client.query("SELECT step, tokens, tokens_per_s FROM steps FINAL WHERE run_id = {r:String} ORDER BY step",
                         parameters={"r": callback.run.run_id}).named_results()
    steps = list(steps)
    assert [(s["step"], s["tokens"]) for s in steps] == [(step, step * 8 * 12) for step in (2, 4, 6)]
    assert all(s["tokens_per_s"] is not None and s["tokens_per_s"] > 0 for s in steps)


@pytest.mark.slow
def test_checkpoints_rotated_away_by_save_total_limit_are_marked_deleted(local_settings, tmp_path):
    callback = TrainwireCallback(experiment="rotation-defaults", settings=local_settings, sample_gpus=False)
    args = default_args(tmp_path, max_steps=5, logging_steps=5, save_steps=1, save_total_limit=2)
    transformers.Trainer(model=tiny_lora_model(), args=args, train_dataset=TokenDataset(64),
                         callbacks=[callback]).train()
    callback.finish()

    reader, client = stored(local_settings)
    run_id = callback.run.run_id
    record = build_audit_record(reader.run_started(run_id), run_ended(client, run_id), reader.checkpoints(run_id), {})
    checkpoints = record["training_record"]["checkpoints"]
    assert [(c["step"], c["deleted"]) for c in checkpoints] == [(1, True), (2, True), (3, True), (4, False),
                                                                 (5, False)]
    for checkpoint in checkpoints:
        assert Path(checkpoint["path"]).exists() is not checkpoint["deleted"]
        assert checkpoint["files"]  # what was recorded while it was on disk stays in the record
