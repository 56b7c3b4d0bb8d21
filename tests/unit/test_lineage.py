"""Lineage and environment helpers: content hashes of datasets and trees, the package-list hash, model lineage."""

import hashlib
import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from trainwire.producers.environment import (
    container_image_digest, hardware, installed_packages, packages_sha256,
)
from trainwire.producers.lineage import (
    config_lineage, count_samples, dataset_lineage, model_lineage, sha256_rows, sha256_tree,
)

ROWS = [{"prompt": "2+2", "answer": "4"}, {"prompt": "capital of France", "answer": "Paris"}]


def sha256_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_tree(root, files: dict[str, str]):
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_row_hash_is_stable_and_counts_rows():
    first, count = sha256_rows(ROWS)
    assert count == 2 and first.startswith("sha256:") and len(first) == 71
    assert sha256_rows([dict(reversed(row.items())) for row in ROWS]) == (first, 2)  # key order is not content


@pytest.mark.parametrize("other", [
    list(reversed(ROWS)),
    ROWS[:1],
    [ROWS[0], {**ROWS[1], "answer": "paris"}],
    [{"prompt": "2+2\n{\"answer\":\"4\"}"}],  # a newline inside a value cannot fake a row boundary
], ids=["reordered", "truncated", "edited", "smuggled-row"])
def test_row_hash_changes_with_order_and_content(other):
    assert sha256_rows(other)[0] != sha256_rows(ROWS)[0]


def test_tensors_and_numpy_values_hash_as_their_numbers():
    torch = pytest.importorskip("torch")
    as_lists = [{"input_ids": [1, 2, 3], "score": 0.5}]
    assert sha256_rows([{"input_ids": torch.tensor([1, 2, 3]), "score": np.float64(0.5)}]) == sha256_rows(as_lists)
    assert sha256_rows([{"input_ids": np.array([1, 2, 3]), "score": 0.5}]) == sha256_rows(as_lists)


def test_a_file_hashes_as_its_bytes(tmp_path):
    path = make_tree(tmp_path, {"a.jsonl": '{"x": 1}\n'}) / "a.jsonl"
    assert sha256_tree(path) == sha256_of(b'{"x": 1}\n')


def test_directory_hash_depends_on_paths_and_contents_not_location_or_creation_order(tmp_path):
    files = {"train/part-0.jsonl": "a\n", "train/part-1.jsonl": "b\n", "README.md": "data card"}
    one = make_tree(tmp_path / "one", files)
    two = make_tree(tmp_path / "two", dict(reversed(files.items())))
    assert sha256_tree(one) == sha256_tree(two)
    (two / "train/part-1.jsonl").write_text("B\n")
    assert sha256_tree(one) != sha256_tree(two)
    three = make_tree(tmp_path / "three", {**files, "train/part-0.jsonl": "b\n", "train/part-1.jsonl": "a\n"})
    assert sha256_tree(one) != sha256_tree(three)  # same bytes under swapped names is different data
    (one / "train/part-0.jsonl").rename(one / "train/part-9.jsonl")
    assert sha256_tree(one) != sha256_tree(make_tree(tmp_path / "four", files))


def test_sample_counts_of_json_lines_and_json_arrays(tmp_path):
    make_tree(tmp_path, {"a.jsonl": '{"x": 1}\n\n{"x": 2}\n', "b.json": json.dumps(ROWS), "c.json": "{}",
                         "d.csv": "x\n1\n"})
    assert [count_samples(tmp_path / n) for n in ("a.jsonl", "b.json", "c.json", "d.csv")] == [2, 2, None, None]


def test_dataset_lineage_of_a_file_and_a_directory(tmp_path):
    make_tree(tmp_path, {"data/train.jsonl": '{"x": 1}\n{"x": 2}\n', "data/info.json": "{}"})
    fields = dataset_lineage(tmp_path / "data/train.jsonl")
    assert fields == {"dataset_path": str(tmp_path / "data/train.jsonl"), "dataset_samples": 2,
                      "dataset_sha256": sha256_of(b'{"x": 1}\n{"x": 2}\n'), "dataset_format": "jsonl"}
    directory = dataset_lineage(str(tmp_path / "data"))
    assert directory["dataset_sha256"] == sha256_tree(tmp_path / "data") and directory["dataset_format"] == "json,jsonl"
    assert directory["dataset_samples"] is None
    with pytest.raises(FileNotFoundError):
        dataset_lineage(tmp_path / "missing.jsonl")


def test_dataset_lineage_of_rows_and_a_datasets_like_object():
    assert dataset_lineage(ROWS) == {"dataset_sha256": sha256_rows(ROWS)[0], "dataset_samples": 2,
                                     "dataset_format": "columns: answer, prompt"}

    class HubDataset(list):
        info = SimpleNamespace(license="cc-by-4.0", homepage="https://huggingface.co/datasets/org/qa", version="1.2.0")

    fields = dataset_lineage(HubDataset(ROWS))
    assert fields["dataset_sha256"] == sha256_rows(ROWS)[0]
    assert (fields["dataset_license"], fields["dataset_source"], fields["dataset_version"]) == (
        "cc-by-4.0", "https://huggingface.co/datasets/org/qa", "1.2.0")
    assert dataset_lineage(iter(ROWS)) == {}  # hashing an iterable dataset would consume it


def test_model_lineage_of_a_peft_model(tmp_path):
    adapter = SimpleNamespace(base_model_name_or_path="meta-llama/Meta-Llama-3-8B", revision="main",
                              to_dict=lambda: {"r": 8, "target_modules": {"v_proj", "q_proj"}})
    config = SimpleNamespace(_name_or_path="meta-llama/Meta-Llama-3-8B", _commit_hash="abc123")
    peft_model = SimpleNamespace(peft_config={"default": adapter},
                                 get_base_model=lambda: SimpleNamespace(config=config))
    fields = model_lineage(peft_model)
    assert fields["base_model"] == "meta-llama/Meta-Llama-3-8B" and fields["base_model_source"] == "hub"
    assert fields["base_model_revision"] == "abc123"  # the exact commit, not the branch asked for
    assert json.loads(fields["adapter_json"]) == {"default": {"r": 8, "target_modules": ["q_proj", "v_proj"]}}

    local = SimpleNamespace(config=SimpleNamespace(_name_or_path=str(tmp_path)))
    assert model_lineage(local) == {"base_model": str(tmp_path), "base_model_source": "local",
                                    "base_model_revision": None}


def test_package_list_hash():
    packages = installed_packages()
    assert packages == sorted(set(packages)) and any(p.startswith("trainwire==") for p in packages)
    assert all(p == p.lower() and "_" not in p.split("==")[0] for p in packages)
    assert packages_sha256() == packages_sha256(packages) == sha256_of("".join(p + "\n" for p in packages).encode())
    assert packages_sha256(["b==1", "a==2"]) == packages_sha256(["a==2", "b==1"])
    assert packages_sha256(["a==2", "b==1"]) != packages_sha256(["a==2", "b==1.0.1"])


def test_container_image_digest_from_the_environment(monkeypatch):
    monkeypatch.delenv("CONTAINER_IMAGE_DIGEST", raising=False)
    monkeypatch.delenv("IMAGE_DIGEST", raising=False)
    assert container_image_digest() is None
    monkeypatch.setenv("IMAGE_DIGEST", "sha256:" + "1" * 64)
    monkeypatch.setenv("CONTAINER_IMAGE_DIGEST", "sha256:" + "2" * 64)
    assert container_image_digest() == "sha256:" + "2" * 64


def test_hardware_answers_without_raising():
    found = hardware()
    assert set(found) == {"gpu_type", "gpu_count", "gpu_driver_version", "cuda_version"}
    assert found["gpu_count"] is None or found["gpu_count"] >= 0


def test_hardware_of_a_gpu_node(monkeypatch):
    class NVMLError(Exception):
        pass

    nvml = SimpleNamespace(NVMLError=NVMLError, nvmlInit=lambda: None, nvmlShutdown=lambda: None,
                           nvmlSystemGetDriverVersion=lambda: b"550.54.15",
                           nvmlSystemGetCudaDriverVersion=lambda: 12040)
    cuda = SimpleNamespace(device_count=lambda: 2, get_device_name=lambda i: "NVIDIA H100 80GB HBM3")
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=cuda))
    assert hardware() == {"gpu_type": "NVIDIA H100 80GB HBM3", "gpu_count": 2, "gpu_driver_version": "550.54.15",
                          "cuda_version": "12.4"}

    def no_driver():
        raise NVMLError("Driver Not Loaded")

    monkeypatch.setattr(nvml, "nvmlInit", no_driver)
    monkeypatch.setattr(cuda, "device_count", lambda: 0)
    assert hardware() == {"gpu_type": None, "gpu_count": 0, "gpu_driver_version": None, "cuda_version": None}


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_config_lineage_hashes_the_file_and_reads_the_git_state(tmp_path):
    config = make_tree(tmp_path, {"train.yaml": "learning_rate: 0.0002\n"}) / "train.yaml"

    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    git("add", "train.yaml")
    git("commit", "-q", "-m", "config")
    assert config_lineage(config) == {"config_file": "train.yaml", "config_sha256": sha256_of(config.read_bytes()),
                                      "git_commit": git("rev-parse", "HEAD"), "git_dirty": False}
    config.write_text("learning_rate: 0.0003\n")
    assert config_lineage(config)["git_dirty"] is True
