"""A real (tiny, randomly initialised) LoRA fine-tune with transformers.Trainer and TrainwireCallback."""

import hashlib
import json
import time
import uuid
from importlib import metadata
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from tests.tiny_training import TokenDataset, tiny_lora_model  # noqa: E402
from trainwire.consumers.service import build_ingest  # noqa: E402
from trainwire.infra.store import connect_store  # noqa: E402
from trainwire.infra.store.read import StoreReader  # noqa: E402
from trainwire.producers import TrainwireCallback, hf_callback  # noqa: E402
from trainwire.producers.environment import packages_sha256  # noqa: E402
from trainwire.producers.hf_callback import shared_run_id  # noqa: E402
from trainwire.producers.lineage import sha256_rows  # noqa: E402


def trainer_for(tmp_path, callback, train_dataset, **overrides):
    args = dict(output_dir=str(tmp_path / "out"), max_steps=12, per_device_train_batch_size=8, learning_rate=1e-3,
                logging_steps=2, eval_strategy="steps", eval_steps=6, save_steps=6, save_total_limit=3, seed=7,
                report_to=[], use_cpu=True, disable_tqdm=True)
    return transformers.Trainer(model=tiny_lora_model(), args=transformers.TrainingArguments(**(args | overrides)),
                                train_dataset=train_dataset, eval_dataset=TokenDataset(16, seed=1),
                                callbacks=[callback])


def stored(settings) -> tuple[StoreReader, object]:
    pipeline = build_ingest(settings, on_alert=lambda a: None)
    pipeline.drain(idle_seconds=1.0)
    pipeline.close()
    client = connect_store(settings.store_dsn)
    return StoreReader(client), client


def stored_once_ended(settings, run_id: str, timeout: float = 20.0) -> tuple[StoreReader, object]:
    """Ingest until the run's end is stored: a run that no save follows ends by itself, END_GRACE_S after training."""
    pipeline = build_ingest(settings, on_alert=lambda a: None)
    client = connect_store(settings.store_dsn)
    reader, deadline = StoreReader(client), time.monotonic() + timeout
    try:
        while pipeline.drain(idle_seconds=0.2) and reader.run_summary(run_id)["status"] == "running":
            assert time.monotonic() < deadline, f"run {run_id} did not end within {timeout}s"
    finally:
        pipeline.close()
    return reader, client


def run_ended(client, run_id: str) -> dict:
    (row,) = client.query("SELECT * FROM run_ended FINAL WHERE run_id = {r:String}", parameters={"r": run_id}
                          ).named_results()
    return row


def sha256_of(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_trainer_run_is_recorded(any_settings, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(hf_callback, "END_GRACE_S", 0.2)  # no save follows training: the run ends by itself
    config_file = tmp_path / "train.yaml"
    config_file.write_text("learning_rate: 0.001\nlogging_steps: 2\n")
    callback = TrainwireCallback(experiment="tiny-lora", settings=any_settings, sample_gpus=False,
                                 config_file=config_file)
    train_dataset = TokenDataset(96)
    trainer_for(tmp_path, callback, train_dataset).train()

    run_id = callback.run.run_id
    reader, client = stored_once_ended(any_settings, run_id)
    assert callback.log_artifacts(tmp_path / "out" / "checkpoint-6") and "already ended" in caplog.text
    counts = reader.event_counts([run_id])
    assert counts["steps"] == 6 and counts["evals"] == 2 and counts["checkpoints"] == 2
    assert counts["run_started"] == counts["run_ended"] == 1
    steps = reader.steps(run_id)
    assert [s["step"] for s in steps] == [2, 4, 6, 8, 10, 12]
    assert all(s["loss"] > 0 and s["learning_rate"] is not None and s["grad_norm"] is not None for s in steps)
    (run,) = [r for r in reader.runs() if r["run_id"] == run_id]
    assert run["status"] == "completed" and run["total_steps"] == 12

    started = reader.run_started(run_id)
    assert (started["seed"], started["numpy_seed"], started["data_seed"], started["world_size"]) == (7, 7, None, 1)
    assert started["cudnn_deterministic"] is False and started["cudnn_benchmark"] is False
    assert started["config_file"] == "train.yaml" and started["config_sha256"] == sha256_of(config_file)
    for package in ("torch", "transformers", "peft"):
        assert started["environment"][package] == metadata.version(package)
    assert started["environment"]["trainwire"] == metadata.version("trainwire") and started["environment"]["python"]
    assert started["packages_sha256"] == packages_sha256()
    assert started["dataset_samples"] == 96
    assert started["dataset_sha256"] == sha256_rows(train_dataset[i] for i in range(96))[0]
    assert started["dataset_format"] == "columns: attention_mask, input_ids, labels"
    assert started["base_model"] == "LlamaForCausalLM"
    adapter = json.loads(started["adapter_json"])["default"]
    assert (adapter["r"], adapter["lora_alpha"], sorted(adapter["target_modules"])) == (4, 8, ["q_proj", "v_proj"])
    hyper = json.loads(started["hyperparameters_json"])
    assert hyper["learning_rate"] == 1e-3 and hyper["logging_steps"] == 2 and hyper["save_total_limit"] == 3

    for checkpoint in reader.checkpoints(run_id):
        on_disk = sorted(p for p in Path(checkpoint["path"]).rglob("*") if p.is_file())
        assert [f["name"] for f in checkpoint["files"]] == [str(p.relative_to(checkpoint["path"])) for p in on_disk]
        for file, path in zip(checkpoint["files"], on_disk):
            assert file["size"] == path.stat().st_size and file["sha256"] == sha256_of(path)

    ended = run_ended(client, run_id)
    assert ended["status"] == "completed" and ended["completed_steps"] == 12 and ended["epochs"] > 0
    last = tmp_path / "out" / "checkpoint-12"
    expected = [last / name for name in ("adapter_config.json", "adapter_model.safetensors", "training_args.bin")]
    assert sorted(f["name"] for f in ended["artifacts"]) == [str(p) for p in expected]
    for file in ended["artifacts"]:
        assert file["size"] == Path(file["name"]).stat().st_size and file["sha256"] == sha256_of(Path(file["name"]))


@pytest.mark.slow
def test_the_with_block_records_the_final_adapter_and_a_dataset_file(local_settings, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"count from {i}", "output": str(i + 1)}) + "\n"
                            for i in range(40)))
    final = tmp_path / "final"
    with TrainwireCallback(experiment="tiny-lora", settings=local_settings, sample_gpus=False, dataset=data,
                           dataset_license="cc-by-4.0", dataset_preprocessing=["tokenize", "pack:16"]) as callback:
        trainer = trainer_for(tmp_path, callback, TokenDataset(32), max_steps=2, eval_strategy="no",
                              save_strategy="no")
        trainer.train()
        trainer.save_model(str(final))
        logged = callback.log_artifacts(final)

    reader, client = stored(local_settings)
    run_id = callback.run.run_id
    started = reader.run_started(run_id)
    assert started["dataset_path"] == str(data) and started["dataset_sha256"] == sha256_of(data)
    assert (started["dataset_samples"], started["dataset_format"], started["dataset_license"]) == (40, "jsonl",
                                                                                                   "cc-by-4.0")
    assert started["dataset_preprocessing"] == ["tokenize", "pack:16"]
    ended = run_ended(client, run_id)
    assert ended["status"] == "completed" and reader.event_counts([run_id])["checkpoints"] == 0
    on_disk = sorted(p for p in final.iterdir() if p.is_file())
    assert "adapter_model.safetensors" in {p.name for p in on_disk}
    assert ended["artifacts"] == [{"name": str(p), "size": p.stat().st_size, "sha256": sha256_of(p)} for p in on_disk]
    assert logged == ended["artifacts"]


@pytest.mark.slow
def test_the_adapter_saved_after_training_is_the_runs_output(local_settings, tmp_path):
    callback = TrainwireCallback(experiment="tiny-lora", settings=local_settings, sample_gpus=False)
    trainer = trainer_for(tmp_path, callback, TokenDataset(32), max_steps=2, eval_strategy="no", save_steps=1)
    trainer.train()
    final = tmp_path / "final"
    trainer.save_model(str(final))  # no callback for it; the run ends with what it wrote
    trainer.evaluate()  # after the run ended: its post-training record

    reader, client = stored(local_settings)
    run_id = callback.run.run_id
    ended = run_ended(client, run_id)
    assert (ended["status"], ended["completed_steps"]) == ("completed", 2)
    model_files = sorted(p for p in final.iterdir() if p.name != "training_args.bin")  # Trainer writes it after
    assert "adapter_model.safetensors" in {p.name for p in model_files}
    assert ended["artifacts"] == [{"name": str(p), "size": p.stat().st_size, "sha256": sha256_of(p)}
                                  for p in model_files]
    (evaluation,) = reader.evals(run_id)
    assert evaluation["ts"] >= ended["ts"]
    assert "save_pretrained" not in vars(trainer.model)  # the model is left as it was


@pytest.mark.slow
def test_each_training_in_a_with_block_is_a_run_of_its_own_that_ends(local_settings, tmp_path):
    with TrainwireCallback(experiment="tiny-lora", settings=local_settings, sample_gpus=False) as callback:
        trainer = trainer_for(tmp_path, callback, TokenDataset(32), max_steps=2, eval_strategy="no",
                              save_strategy="no")
        trainer.train()
        first = callback.run.run_id
        trainer.train()  # a second training: the first one's run ends before it starts

    reader, client = stored(local_settings)
    assert first != callback.run.run_id
    for run_id in (first, callback.run.run_id):
        assert (run_ended(client, run_id)["status"], run_ended(client, run_id)["completed_steps"]) == ("completed", 2)


class Explode(transformers.TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")


@pytest.mark.slow
def test_training_that_raises_ends_the_run_as_failed(local_settings, tmp_path):
    with pytest.raises(RuntimeError, match="illegal memory access"):
        with TrainwireCallback(experiment="tiny-lora", settings=local_settings, sample_gpus=False) as callback:
            trainer = trainer_for(tmp_path, callback, TokenDataset(64), eval_strategy="no", save_steps=2)
            trainer.add_callback(Explode())
            trainer.train()

    reader, client = stored(local_settings)
    ended = run_ended(client, callback.run.run_id)
    assert ended["status"] == "failed" and ended["completed_steps"] == 3
    assert ended["error"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    # the adapter of the last checkpoint saved before the failure
    assert [Path(f["name"]).parent.name for f in ended["artifacts"]] == ["checkpoint-2"] * 3


@pytest.mark.parametrize("field", ["dataset_licence", "seq"])
def test_unknown_run_started_fields_are_refused_at_construction(field):
    with pytest.raises(TypeError, match=field):
        TrainwireCallback(experiment="x", **{field: 1})


def _rank_main(rank: int, port: int, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        # rank 1's own choice must lose to rank 0's
        Path(out, f"rank{rank}").write_text(shared_run_id("rank-zero-id" if rank == 0 else "rank-one-id"))
    finally:
        torch.distributed.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_every_rank_gets_rank_zeros_run_id(tmp_path):
    # fork: the children inherit the imports, so this takes a second rather than two imports of transformers
    torch.multiprocessing.start_processes(_rank_main, args=(free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    assert (tmp_path / "rank0").read_text() == (tmp_path / "rank1").read_text() == "rank-zero-id"


def test_without_a_process_group_torchrun_ranks_agree_on_the_rendezvous_id(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1234")
    assert shared_run_id() == shared_run_id() == str(uuid.UUID(shared_run_id()))
    assert shared_run_id("given") == "given"
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert shared_run_id() != shared_run_id()
