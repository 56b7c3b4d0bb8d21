"""`trainwire llamafactory train` runs a real LLaMA-Factory LoRA SFT (a tiny random Llama, a tokenizer and an
alpaca dataset made here) with `trainwire up` running, and records what LLaMA-Factory knows beyond the Trainer.

LLaMA-Factory pins transformers, peft and accelerate below what the main environment holds, so it lives in its
own environment (`infra/setup --dev` makes it at .venv/envs/llamafactory, over the main one's packages); the
training runs there, the checks here. Run as a script in that environment, this file builds the inputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from trainwire.consumers.service import build_ingest
from trainwire.infra.config import Settings
from trainwire.infra.store import connect_store
from trainwire.infra.store.read import StoreReader

ROOT = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
LLAMAFACTORY_PYTHON = Path(os.environ.get("TRAINWIRE_TEST_LLAMAFACTORY_PYTHON",
                                          ROOT / ".venv/envs/llamafactory/bin/python"))
ROWS = [{"instruction": f"add {a} and {b}", "input": "", "output": str(a + b)} for a in range(8) for b in range(6)]
STEPS = 12
QUIET_AFTER_END_S = 12  # twice the silence after which the detector below would call a live run stalled


def build_inputs(model_dir: Path, data_dir: Path) -> None:
    """A tiny random Llama with a byte-level BPE tokenizer trained on the dataset's text, and the dataset."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    data_dir.mkdir(parents=True)
    (data_dir / "sums.json").write_text(json.dumps(ROWS))
    (data_dir / "dataset_info.json").write_text(json.dumps({"sums": {"file_name": "sums.json"}}))
    text = [f"Human: {r['instruction']}\nAssistant:{r['output']}\n" for r in ROWS]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", pad_token="<pad>")
    fast.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    fast.save_pretrained(model_dir)
    config = transformers.LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(model_dir)


def sha256sum(path: Path) -> str:
    out = subprocess.run(["sha256sum", str(path)], capture_output=True, text=True, check=True).stdout
    return "sha256:" + out.split()[0]


def tree_sha256(root: Path) -> str:
    """One SHA-256 over the sorted (relative path, sha256sum) list of a directory's files."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(root).as_posix()}\0{sha256sum(path)}\n".encode())
    return "sha256:" + digest.hexdigest()


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def llamafactory_python() -> Path:
    """The environment LLaMA-Factory is installed in (a failure in CI, never a skip)."""
    found = LLAMAFACTORY_PYTHON.exists() and subprocess.run(
        [str(LLAMAFACTORY_PYTHON), "-c", "import llamafactory, trainwire"], capture_output=True).returncode == 0
    if not found:
        reason = f"LLaMA-Factory is not installed at {LLAMAFACTORY_PYTHON} (bash infra/setup --dev installs it)"
        pytest.fail(reason) if IN_CI else pytest.skip(reason)
    return LLAMAFACTORY_PYTHON


@pytest.fixture(scope="module")
def inputs(llamafactory_python, tmp_path_factory) -> tuple[Path, Path]:
    """(the tiny model's directory, the dataset's directory), built in LLaMA-Factory's environment."""
    root = tmp_path_factory.mktemp("llamafactory-inputs")
    subprocess.run([str(llamafactory_python), __file__, str(root / "model"), str(root / "data")], check=True,
                   timeout=300)
    return root / "model", root / "data"


def environment(home: Path, tmp_path: Path) -> dict[str, str]:
    config = tmp_path / "trainwire.toml"
    # a live run beats every second, so a false stall after the run's end would fire within 6 s
    config.write_text("[detectors.run_stalled]\nmin_interval_s = 2.0\nfactor = 3.0\n")
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("TRAINWIRE_") and k not in (
        "FORCE_TORCHRUN", "LOCAL_RANK", "RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID", "NPROC_PER_NODE")}
    return {**inherited, "TRAINWIRE_HOME": str(home), "TRAINWIRE_CONFIG": str(config),
            "TRAINWIRE_HEARTBEAT_SECONDS": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
            "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


@contextlib.contextmanager
def trainwire_up(env: dict[str, str], timeout: float = 90) -> Iterator[None]:
    up = subprocess.Popen([sys.executable, "-m", "trainwire", "up", "--no-dashboard"], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + timeout
        while not (Path(env["TRAINWIRE_HOME"]) / "up.json").exists():
            assert up.poll() is None, up.stdout.read()
            assert time.monotonic() < deadline, "trainwire up did not start"
            time.sleep(0.2)
        yield
    finally:
        up.send_signal(signal.SIGTERM)
        assert up.wait(60) == 0


def write_config(repo: Path, model_dir: Path, output_dir: Path, evaluate: bool = True) -> Path:
    config = repo / "train.yaml"
    evaluation = """\
### eval
val_size: 0.25
per_device_eval_batch_size: 4
eval_strategy: steps
eval_steps: 6
do_eval: true
"""
    config.write_text(f"""\
### model
model_name_or_path: {model_dir}
### method
stage: sft
do_train: true
finetuning_type: lora
lora_target: all
lora_rank: 4
### dataset
dataset: sums
dataset_dir: data
template: default
cutoff_len: 32
overwrite_cache: true
### output
output_dir: {output_dir}
logging_steps: 2
save_steps: 6
report_to: none
### train
per_device_train_batch_size: 4
learning_rate: 1.0e-3
max_steps: 30
seed: 7
use_cpu: true
{evaluation if evaluate else ''}### what LLaMA-Factory cannot know
trainwire:
  experiment: tiny-llamafactory
  dataset_source: generated by tests/integration/test_llamafactory.py
""")
    return config


@pytest.mark.slow
def test_lora_sft_through_trainwire_llamafactory_train(llamafactory_python, inputs, tmp_path):
    model_dir, repo, output_dir, home = inputs[0], tmp_path / "repo", tmp_path / "out", tmp_path / "home"
    shutil.copytree(inputs[1], repo / "data")
    config = write_config(repo, model_dir, output_dir)
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "tiny sft")
    env = environment(home, tmp_path)

    with trainwire_up(env):
        trained = subprocess.run(
            [str(llamafactory_python), "-m", "trainwire", "llamafactory", "train", "--json", "--run-name", "lora-r4",
             "--dataset-license", "cc0-1.0", "train.yaml", f"max_steps={STEPS}"],
            cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        assert trained.returncode == 0, trained.stderr[-4000:]
        ended_at = time.monotonic()
        summary = json.loads(trained.stdout.strip().splitlines()[-1])
        time.sleep(max(0.0, QUIET_AFTER_END_S - (time.monotonic() - ended_at)))
    assert summary["status"] == "completed" and summary["completed_steps"] == STEPS
    run_id = summary["run_id"]
    gates = subprocess.run([sys.executable, "-m", "trainwire", "gates", run_id, "--json"], env=env,
                           capture_output=True, text=True, timeout=120)
    (g6,) = [g for g in json.loads(gates.stdout)["gates"] if g["gate"] == "G6"]
    assert g6["status"] == "passed", g6

    client = connect_store(Settings(home=home).store_dsn)
    reader = StoreReader(client)
    assert [a["rule"] for a in reader.alerts(run_id) if a["rule"] == "run_stalled"] == []

    # evals: LLaMA-Factory's log history during training, then its evaluation after training
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    final = json.loads((output_dir / "eval_results.json").read_text())
    expected = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h] + [(STEPS, final["eval_loss"])]
    stored = client.query("SELECT step, eval_loss, ts FROM evals FINAL WHERE run_id = {r:String} ORDER BY step, ts",
                          parameters={"r": run_id}).result_rows
    assert [s for s, _, _ in stored] == [s for s, _ in expected] == [6, 12, 12]
    assert [loss for _, loss, _ in stored] == pytest.approx([loss for _, loss in expected])
    (ended,) = client.query("SELECT ts, status, completed_steps, artifacts FROM run_ended FINAL "
                            "WHERE run_id = {r:String}", parameters={"r": run_id}).named_results()
    assert [ts > ended["ts"] for _, _, ts in stored] == [False, False, True]  # the last one is post-training
    assert (ended["status"], ended["completed_steps"]) == ("completed", STEPS)

    started = reader.run_started(run_id)
    assert (started["experiment"], started["run_name"]) == ("tiny-llamafactory", "lora-r4")
    data_file = repo / "data" / "sums.json"
    assert started["dataset_sha256"] == sha256sum(data_file)
    assert (started["dataset_path"], started["dataset_samples"]) == (str(data_file.resolve()), len(ROWS))
    assert started["dataset_format"] == "alpaca json"
    assert started["dataset_source"] == "generated by tests/integration/test_llamafactory.py"
    assert started["dataset_license"] == "cc0-1.0" and started["dataset_version"] is None
    assert {"template=default", "cutoff_len=32", "val_size=0.25"} <= set(started["dataset_preprocessing"])
    assert (started["base_model"], started["base_model_source"]) == (str(model_dir), "local")
    assert started["base_model_sha256"] == tree_sha256(model_dir)
    assert (started["config_file"], started["config_sha256"]) == ("train.yaml", sha256sum(config))
    assert (started["git_commit"], started["git_dirty"]) == (git(repo, "rev-parse", "HEAD"), False)
    assert started["tags"] == {"config_overrides": f"max_steps={STEPS}"}
    hyper = json.loads(started["hyperparameters_json"])
    assert (hyper["max_steps"], hyper["learning_rate"], hyper["seed"]) == (STEPS, 1e-3, 7)  # TrainingArguments
    assert (hyper["template"], hyper["cutoff_len"], hyper["dataset"]) == ("default", 32, ["sums"])  # data
    assert (hyper["model_name_or_path"], hyper["lora_rank"]) == (str(model_dir), 4)  # model, fine-tuning
    assert hyper["max_new_tokens"] == 1024 and hyper["hf_hub_token"] is None  # generating; defaults filled in

    artifacts = {Path(a["name"]): a["sha256"] for a in ended["artifacts"]}
    adapter = output_dir / "adapter_model.safetensors"
    assert artifacts.get(adapter) == sha256sum(adapter), artifacts  # the final adapter save_model wrote
    assert not any(path.name in ("trainer_log.jsonl", "all_results.json") for path in artifacts)


if __name__ == "__main__":
    build_inputs(Path(sys.argv[1]), Path(sys.argv[2]))


@pytest.mark.slow
def test_force_torchrun_launches_every_rank_into_one_run(llamafactory_python, inputs, tmp_path):
    """FORCE_TORCHRUN, as with llamafactory-cli: `trainwire llamafactory train` relaunches itself under torchrun
    (2 CPU processes, gloo); rank 0 records the one run, with its world size."""
    work, home = tmp_path / "work", tmp_path / "home"
    shutil.copytree(inputs[1], work / "data")
    write_config(work, inputs[0], tmp_path / "out", evaluate=False)
    env = {**environment(home, tmp_path), "FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2", "OMP_NUM_THREADS": "1"}
    trained = subprocess.run([str(llamafactory_python), "-m", "trainwire", "llamafactory", "train", "--json",
                              "train.yaml", "max_steps=4"], cwd=work, env=env, capture_output=True, text=True,
                             timeout=600)
    assert trained.returncode == 0, trained.stderr[-4000:]
    assert "-m torch.distributed.run" in trained.stderr and "--nproc_per_node 2" in trained.stderr
    (line,) = [line for line in trained.stdout.splitlines() if line.startswith('{"run_id"')]  # rank 0 alone
    summary = json.loads(line)

    settings = Settings(home=home)
    ingest = build_ingest(settings, on_alert=lambda alert: None)
    ingest.drain(idle_seconds=1.0)
    ingest.close()
    client = connect_store(settings.store_dsn)
    started = client.query("SELECT run_id, world_size FROM run_started FINAL").result_rows
    ended = client.query("SELECT run_id, status, completed_steps FROM run_ended FINAL").result_rows
    assert started == [(summary["run_id"], 2)] and ended == [(summary["run_id"], "completed", 4)]
