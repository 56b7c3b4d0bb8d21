"""The stop switch in a multi-process run: torchrun starts 2 CPU processes (gloo) that fine-tune a tiny LoRA model with
the callback on each rank; the weights turn NaN mid-run; the test process runs the real ingest, detectors and alert
consumer on the local log and chdb. Both ranks stop at the same step, after one final checkpoint; one run, one run
ended. Run as a script, this file is what each rank runs."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from tests.integration.test_hf_callback import TokenDataset, run_ended, stored, tiny_lora_model  # noqa: E402
from tests.integration.test_stop_switch_end_to_end import alerts_routed_in, stored_summary  # noqa: E402
from trainwire.infra.config import Settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
POISONED_AT = 4
STEP_SECONDS = 0.2
MAX_STEPS = 60


class PoisonAndPace(transformers.TrainerCallback):
    """Every rank's weights turn NaN after step POISONED_AT; steps take STEP_SECONDS, as real ones take seconds."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == POISONED_AT:
            with torch.no_grad():
                model.get_input_embeddings().weight.fill_(math.nan)
        time.sleep(STEP_SECONDS)


def rank_main(home: str, out: str) -> None:
    from trainwire.producers import TrainwireCallback

    callback = TrainwireCallback(experiment="nan-ddp", settings=Settings(home=Path(home), batch_max_seconds=0.2),
                                 sample_gpus=False, stop_on_block=True)
    args = transformers.TrainingArguments(output_dir=str(Path(out) / "train"), max_steps=MAX_STEPS, logging_steps=1,
                                          per_device_train_batch_size=4, report_to=[], use_cpu=True,
                                          disable_tqdm=True, ddp_backend="gloo")
    trainer = transformers.Trainer(model=tiny_lora_model(), args=args, train_dataset=TokenDataset(64),
                                   callbacks=[callback, PoisonAndPace()])
    trainer.train()
    rank = trainer.args.process_index
    report = {"step": trainer.state.global_step, "run_id": callback.run.run_id if callback.run else None}
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))


@pytest.mark.slow
def test_a_block_alert_stops_every_rank_at_the_same_step(local_settings, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINWIRE_")}
    env |= {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               __file__, str(local_settings.home), str(tmp_path)]
    with alerts_routed_in(local_settings) as pager:
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-4000:]
        ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
        run_id = ranks[0]["run_id"]
        summary = stored_summary(local_settings, run_id)

    stopped_at = ranks[0]["step"]
    assert ranks[1]["step"] == stopped_at, f"the ranks stopped at different steps: {ranks}"
    assert POISONED_AT < stopped_at < MAX_STEPS and ranks[1]["run_id"] is None  # only rank 0 records the run
    final = tmp_path / "train" / f"checkpoint-{stopped_at}"
    assert (final / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "train").glob("checkpoint-*")) == [final.name]  # one: the final one
    assert summary["status"] == "stopped" and summary["error"].startswith("loss_not_finite: ")
    assert [c["path"] for c in summary["checkpoints_stored"]] == [str(final)]
    (page,) = [p for p in pager.bodies() if p["run_id"] == run_id]
    assert (page["rule"], page["step"]) == ("loss_not_finite", POISONED_AT + 1)

    reader, client = stored(local_settings)
    assert reader.event_counts([run_id])["run_ended"] == 1 and run_ended(client, run_id)["completed_steps"] == stopped_at
    (started,) = client.query("SELECT world_size, tags FROM run_started FINAL WHERE run_id = {r:String}",
                              parameters={"r": run_id}).result_rows
    assert started[0] == 2 and started[1]["trainwire.stop_on_block"] == "true"


if __name__ == "__main__":
    rank_main(*sys.argv[1:])
