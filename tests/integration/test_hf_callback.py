"""A real (tiny, randomly initialised) LoRA fine-tune with transformers.Trainer and TrainwireCallback."""

import hashlib
import json
from importlib import metadata
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from trainwire.consumers.service import build_ingest  # noqa: E402
from trainwire.infra.store import connect_store  # noqa: E402
from trainwire.infra.store.read import StoreReader  # noqa: E402
from trainwire.producers import TrainwireCallback  # noqa: E402


class TokenDataset(torch.utils.data.Dataset):
    """Random token sequences with a learnable pattern (each row counts upward from a random start)."""

    def __init__(self, rows: int, length: int = 16, vocab: int = 64, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, vocab, (rows, 1), generator=generator)
        self.ids = (starts + torch.arange(length)) % vocab

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i], "attention_mask": torch.ones_like(self.ids[i])}


def tiny_lora_model():
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return peft.get_peft_model(base, lora)


@pytest.mark.slow
def test_trainer_run_is_recorded(local_settings, tmp_path):
    config_file = tmp_path / "train.yaml"
    config_file.write_text("learning_rate: 0.001\nlogging_steps: 2\n")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=12, per_device_train_batch_size=8, learning_rate=1e-3,
        logging_steps=2, eval_strategy="steps", eval_steps=6, save_steps=6, save_total_limit=3, seed=7,
        report_to=[], use_cpu=True, disable_tqdm=True,
    )
    callback = TrainwireCallback(experiment="tiny-lora", settings=local_settings, sample_gpus=False,
                                 config_file=config_file)
    trainer = transformers.Trainer(model=tiny_lora_model(), args=args, train_dataset=TokenDataset(96),
                                   eval_dataset=TokenDataset(16, seed=1), callbacks=[callback])
    trainer.train()

    pipeline = build_ingest(local_settings, on_alert=lambda a: None)
    pipeline.drain(idle_seconds=1.0)
    pipeline.close()
    reader = StoreReader(connect_store(local_settings.store_dsn))
    run_id = callback.run.run_id
    counts = reader.event_counts([run_id])
    assert counts["steps"] == 6 and counts["evals"] == 2 and counts["checkpoints"] == 2
    assert counts["run_started"] == counts["run_ended"] == 1
    steps = reader.steps(run_id)
    assert [s["step"] for s in steps] == [2, 4, 6, 8, 10, 12]
    assert all(s["loss"] > 0 and s["learning_rate"] is not None and s["grad_norm"] is not None for s in steps)
    (run,) = [r for r in reader.runs() if r["run_id"] == run_id]
    assert run["status"] == "completed" and run["total_steps"] == 12
    started = reader.run_started(run_id)
    assert started["seed"] == 7
    assert started["config_sha256"] == "sha256:" + hashlib.sha256(config_file.read_bytes()).hexdigest()
    assert started["environment"]["torch"] == metadata.version("torch")
    assert started["environment"]["peft"] == metadata.version("peft")
    hyper = json.loads(started["hyperparameters_json"])
    assert hyper["learning_rate"] == 1e-3 and hyper["logging_steps"] == 2

    for checkpoint in reader.checkpoints(run_id):
        on_disk = sorted(p for p in Path(checkpoint["path"]).rglob("*") if p.is_file())
        assert [f["name"] for f in checkpoint["files"]] == [str(p.relative_to(checkpoint["path"])) for p in on_disk]
        for file, path in zip(checkpoint["files"], on_disk):
            assert file["size"] == path.stat().st_size
            assert file["sha256"] == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
