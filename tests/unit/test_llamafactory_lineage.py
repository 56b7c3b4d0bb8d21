"""LLaMA-Factory's arguments as lineage: dataset_info.json resolution, file hashes, the dict-args config hash, the
`trainwire:` section, and the torchrun launch `llamafactory-cli train` would make. No LLaMA-Factory needed."""

import hashlib
import json
import sys
from pathlib import Path

import pytest

from trainwire.cli import main
from trainwire.producers.llamafactory_lineage import (
    arguments_sha256, base_model_fields, count_rows, dataset_fields, resolve_datasets,
)

ROWS = [{"instruction": "add 1 and 2", "input": "", "output": "3"}, {"instruction": "add 2 and 2", "output": "4"}]


def sha256_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def dataset_dir(root: Path, info: dict, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "dataset_info.json").write_text(json.dumps(info))
    return root


def test_names_resolve_through_dataset_info_as_llamafactory_reads_them(tmp_path, monkeypatch):
    monkeypatch.delenv("USE_MODELSCOPE_HUB", raising=False)
    data = dataset_dir(tmp_path, {
        "sums": {"file_name": "sums.json"},
        "chats": {"file_name": "chats", "formatting": "sharegpt"},
        "alpaca": {"hf_hub_url": "tatsu-lab/alpaca", "ms_hub_url": "AI-ModelScope/alpaca"},
        "ms_only": {"ms_hub_url": "AI-ModelScope/x"},
        "cloud": {"cloud_file_name": "s3://bucket/rows.json"},
    }, {"sums.json": json.dumps(ROWS), "chats/a.jsonl": "{}\n"})
    entries = resolve_datasets("sums, chats,alpaca,ms_only,cloud", str(data))
    assert [(e.name, e.path, e.source, e.formatting) for e in entries] == [
        ("sums", data / "sums.json", None, "alpaca"), ("chats", data / "chats", None, "sharegpt"),
        ("alpaca", None, "hf:tatsu-lab/alpaca", "alpaca"), ("ms_only", None, "ms:AI-ModelScope/x", "alpaca"),
        ("cloud", None, "s3://bucket/rows.json", "alpaca")]
    monkeypatch.setenv("USE_MODELSCOPE_HUB", "1")  # as LLaMA-Factory does, the hub it is told to use
    assert resolve_datasets(["alpaca"], str(data))[0].source == "ms:AI-ModelScope/alpaca"
    assert [e.source for e in resolve_datasets("a,b", "ONLINE")] == ["ms:a", "ms:b"]
    assert resolve_datasets(None, str(data)) == []


def test_an_undefined_dataset_or_a_missing_dataset_info_is_named(tmp_path):
    data = dataset_dir(tmp_path, {"sums": {"file_name": "sums.json"}}, {})
    with pytest.raises(ValueError, match=r"dataset 'other' is not defined in .*dataset_info.json"):
        resolve_datasets("other", str(data))
    with pytest.raises(ValueError, match=r"cannot read .*nowhere/dataset_info.json"):
        resolve_datasets("sums", str(tmp_path / "nowhere"))


def test_one_dataset_file_is_recorded_by_its_own_hash_rows_and_preprocessing(tmp_path):
    data = dataset_dir(tmp_path / "data", {"sums": {"file_name": "sums.json", "columns": {"prompt": "instruction"}}},
                       {"sums.json": json.dumps(ROWS)})
    fields = dataset_fields({"dataset": ["sums"], "dataset_dir": str(data), "template": "llama3", "cutoff_len": 1024,
                             "val_size": 0.1, "mix_strategy": "concat", "train_on_prompt": False, "packing": None})
    assert fields == {
        "dataset_path": str((data / "sums.json").resolve()),
        "dataset_sha256": sha256_of((data / "sums.json").read_bytes()),  # what sha256sum prints
        "dataset_samples": 2,
        "dataset_format": "alpaca json",
        "dataset_preprocessing": ["template=llama3", "cutoff_len=1024", "val_size=0.1",
                                  'dataset_info[sums]={"columns":{"prompt":"instruction"},"file_name":"sums.json"}'],
    }


def test_several_datasets_hash_as_one_over_their_names_and_hashes(tmp_path, monkeypatch):
    info = {"a": {"file_name": "a.jsonl"}, "b": {"file_name": "b", "formatting": "sharegpt"}}
    data = dataset_dir(tmp_path / "data", info, {"a.jsonl": '{"x": 1}\n{"x": 2}\n\n', "b/1.jsonl": '{"x": 3}\n',
                                                 "b/2.json": "[{}, {}]"})
    monkeypatch.chdir(tmp_path)  # dataset_dir relative to the working directory, as LLaMA-Factory reads it
    fields = dataset_fields({"dataset": "a,b", "dataset_dir": "data", "mix_strategy": "interleave_under"})
    folder = dataset_fields({"dataset": "b", "dataset_dir": "data"})["dataset_sha256"]
    pairs = [("a.jsonl", sha256_of(b'{"x": 1}\n{"x": 2}\n\n')), ("b", folder)]
    expected = hashlib.sha256("".join(f"{name}\0{sha}\n" for name, sha in pairs).encode()).hexdigest()
    assert fields["dataset_sha256"] == f"sha256:{expected}" and folder.startswith("sha256:")
    assert fields["dataset_samples"] == 2 + 1 + 2
    assert fields["dataset_path"] == f"{(data / 'a.jsonl').resolve()},{(data / 'b').resolve()}"
    assert fields["dataset_format"] == "alpaca jsonl, sharegpt json,jsonl"
    assert "mix_strategy=interleave_under" in fields["dataset_preprocessing"]


def test_a_hub_dataset_has_a_source_and_leaves_the_hash_to_the_rows(tmp_path):
    data = dataset_dir(tmp_path, {"alpaca": {"hf_hub_url": "tatsu-lab/alpaca"}, "sums": {"file_name": "s.json"}},
                       {"s.json": "[]"})
    fields = dataset_fields({"dataset": "alpaca,sums", "dataset_dir": str(data), "template": "default"})
    assert fields["dataset_source"] == "hf:tatsu-lab/alpaca" and "dataset_sha256" not in fields
    assert fields["dataset_path"] == str((data / "s.json").resolve())


def test_a_saved_tokenized_dataset_is_what_is_hashed(tmp_path):
    tokenized = tmp_path / "tokenized"
    (tokenized / "train").mkdir(parents=True)
    (tokenized / "train" / "data-00000.arrow").write_bytes(b"rows")
    fields = dataset_fields({"dataset": "missing", "dataset_dir": str(tmp_path), "tokenized_path": str(tokenized)})
    assert fields["dataset_path"] == str(tokenized.resolve()) and fields["dataset_sha256"].startswith("sha256:")


@pytest.mark.parametrize(("name", "text", "rows"), [
    ("a.json", json.dumps(ROWS), 2), ("a.json", '{"x": 1}\n{"x": 2}\n', 2), ("a.jsonl", '{"x": 1}\n', 1),
    ("a.csv", 'q,a\n"two\nlines",1\nb,2\n', 2), ("a.txt", "text", None)])
def test_rows_are_counted_per_format(tmp_path, name, text, rows):
    (tmp_path / name).write_text(text)
    assert count_rows(tmp_path / name) == rows


def test_a_local_base_model_directory_hashes_over_its_files_without_hidden_ones(tmp_path):
    model = tmp_path / "model"
    for name, content in {"config.json": b"{}", "model.safetensors": b"weights", "sub/tokenizer.json": b"tok",
                          ".cache/huggingface/download/x.metadata": b"etag, time"}.items():
        (model / name).parent.mkdir(parents=True, exist_ok=True)
        (model / name).write_bytes(content)
    pairs = [("config.json", b"{}"), ("model.safetensors", b"weights"), ("sub/tokenizer.json", b"tok")]
    expected = hashlib.sha256("".join(f"{n}\0{sha256_of(c)}\n" for n, c in pairs).encode()).hexdigest()
    assert base_model_fields(str(model)) == {"base_model_sha256": f"sha256:{expected}"}
    assert base_model_fields("meta-llama/Llama-3.1-8B") == {} and base_model_fields(None) == {}


def test_arguments_given_as_a_dict_hash_as_canonical_json():
    args = {"model_name_or_path": "m", "learning_rate": 1e-4, "dataset": "alpaca_en_demo", "template": "llama3"}
    canonical = json.dumps(args, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert arguments_sha256(args) == sha256_of(canonical.encode())
    assert arguments_sha256(dict(reversed(args.items()))) == arguments_sha256(args)
    assert arguments_sha256({**args, "learning_rate": 2e-4}) != arguments_sha256(args)


def test_the_callback_hashes_dict_arguments_and_takes_out_the_trainwire_section(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from trainwire.producers import llamafactory

    monkeypatch.setattr(llamafactory, "llamafactory_arguments", lambda args: {})  # LLaMA-Factory is not needed
    monkeypatch.setattr(sys, "argv", ["train.py", str(tmp_path / "other.yaml")])  # not the config: args are given
    args = {"model_name_or_path": "m", "dataset": "sums", "dataset_dir": str(tmp_path), "learning_rate": 1e-4,
            "trainwire": {"experiment": "sft", "dataset_license": "cc-by-4.0", "tags": {"ticket": "ML-1"}}}
    (tmp_path / "dataset_info.json").write_text('{"sums": {"file_name": "s.json"}}')
    (tmp_path / "s.json").write_text("[]")
    callback = llamafactory.LlamaFactoryCallback(args, dataset_source="hf:x/y", tags={"team": "nlp"})
    without = {k: v for k, v in args.items() if k != "trainwire"}
    assert callback.args == without and callback.experiment == "sft" and callback.config_file is None
    assert callback.overrides["config_sha256"] == arguments_sha256(without)
    assert (callback.overrides["dataset_license"], callback.overrides["dataset_source"]) == ("cc-by-4.0", "hf:x/y")
    assert callback.overrides["tags"] == {"ticket": "ML-1", "team": "nlp"}
    assert callback._lineage.result()["dataset_sha256"] == sha256_of(b"[]")


def test_torchrun_is_launched_as_llamafactory_cli_would():
    from trainwire.producers.llamafactory import torchrun_command

    argv = ["llamafactory", "train", "--", "x.yaml"]
    assert torchrun_command(argv, {}, device_count=1) is None
    assert torchrun_command(argv, {"USE_RAY": "1"}, device_count=4) is None
    assert torchrun_command(argv, {"LOCAL_RANK": "0", "FORCE_TORCHRUN": "1"}, device_count=4) is None  # launched
    command, env = torchrun_command(argv, {}, device_count=2, free_port=lambda: 29555)
    assert command == [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--node_rank", "0",
                       "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", "29555",
                       "-m", "trainwire", *argv]
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    command, env = torchrun_command(argv, {"FORCE_TORCHRUN": "true", "NPROC_PER_NODE": "2", "OPTIM_TORCH": "0",
                                           "RDZV_ID": "job", "MIN_NNODES": "1", "MAX_NNODES": "3",
                                           "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"}, device_count=0)
    assert command[3:17] == ["--nnodes", "1:3", "--nproc-per-node", "2", "--rdzv-id", "job", "--rdzv-backend", "c10d",
                             "--rdzv-endpoint", "10.0.0.1:29400", "--max-restarts", "0", "-m", "trainwire"]
    assert "PYTORCH_CUDA_ALLOC_CONF" not in env


@pytest.mark.parametrize(("argv", "says"), [
    (["llamafactory", "train"], "give CONFIG.yaml"),
    (["llamafactory", "train", "missing.yaml"], "config file missing.yaml does not exist"),
    (["llamafactory", "train", "--tag", "nokey", "x.yaml"], "--tag 'nokey': expected KEY=VALUE"),
    (["llamafactory", "train", "x.yaml", "max_steps=3", "--experiment", "e"],
     "'--experiment' is not a key=value override of x.yaml (trainwire's own options go before the config file)"),
])
def test_the_command_refuses_what_it_cannot_run_in_one_line(capsys, tmp_path, monkeypatch, argv, says):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.yaml").write_text("stage: sft\n")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1
