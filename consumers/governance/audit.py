"""The audit record of a run (spec §7), assembled from its stored events, and what G6 finds missing in it.

Four sections: input artifacts, training record, output artifacts, reproducibility. Hashes are `sha256:<hex>`,
timestamps ISO 8601 UTC, the run id a UUID and the experiment id a UUID derived from the experiment's name.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from trainwire.infra.store.audit_chain import iso_utc, sha256_of

SHA256 = re.compile(r"^sha256:[0-9a-f]{64}$")
SECTIONS = ("input_artifacts", "training_record", "output_artifacts", "reproducibility")
# Experiments are named, not numbered: the same name always maps to the same experiment id.
_EXPERIMENT_NAMESPACE = uuid.UUID("0b7d4a52-3c1e-4f8e-9d6a-1e2f3a4b5c6d")
_TRAINING_ARGS = ("training_args.bin", "training_args.json")
# Names of Hugging Face `datasets` builders: what `Dataset.info.builder_name` says of a dataset loaded from local
# files. They tell the file format, not where the data came from, so they never stand for a dataset's source.
DATASET_BUILDERS = frozenset({"json", "csv", "parquet", "arrow", "text", "pandas", "generator", "imagefolder",
                              "audiofolder", "videofolder", "webdataset", "sql", "xml", "cache", "spark", "folder"})
PLACEHOLDER_VERSIONS = frozenset({"0.0.0", "0.0", "0", "none", "null", "unknown"})

Row = dict[str, Any]


def experiment_id(experiment: str) -> str:
    return str(uuid.uuid5(_EXPERIMENT_NAMESPACE, experiment))


def _files(files: list) -> list[dict[str, Any]]:
    """Stored Array(Tuple(name, size, sha256)) rows, or dicts, as dicts."""
    return [f if isinstance(f, dict) else {"name": f[0], "size": f[1], "sha256": f[2]} for f in files]


def _hyperparameters(started: Row) -> dict[str, Any]:
    try:
        return json.loads(started.get("hyperparameters_json") or "{}")
    except ValueError:
        return {"unparsed": started.get("hyperparameters_json")}


def _training_args(started: Row, artifacts: list[dict]) -> dict[str, Any]:
    """The training args file's hash when it is an artifact, else the hash of the recorded hyperparameters."""
    artifact = next((a for a in artifacts if a["name"].rsplit("/", 1)[-1] in _TRAINING_ARGS), None)
    if artifact is not None:
        return {"source": artifact["name"], "sha256": artifact["sha256"]}
    if started.get("hyperparameters_json") not in (None, "", "{}"):
        return {"source": "hyperparameters_json", "sha256": sha256_of(started["hyperparameters_json"])}
    return {"source": None, "sha256": None}


def _checkpoints(rows: list[Row]) -> list[dict[str, Any]]:
    """Each recorded checkpoint once, `deleted` when a later marker says it is gone from disk (checkpoint v2)."""
    gone = {(c["step"], c["path"]) for c in rows if c.get("deleted")}
    return [{"step": c["step"], "path": c["path"], "eval_loss": c.get("eval_loss"), "is_best": c.get("is_best"),
             "created_at": iso_utc(c.get("ts")), "files": _files(c.get("files") or []),
             "deleted": (c["step"], c["path"]) in gone} for c in rows if not c.get("deleted")]


def build_audit_record(started: Row | None, ended: Row | None, checkpoints: list[Row],
                       final_metrics: dict[str, float], gates: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The record from stored rows (run started, run ended, checkpoints), the run's final metrics and its latest
    gate evaluation (overall, when, per gate status). None when the run has no run started event stored."""
    if started is None:
        return None
    ended = ended or {}
    artifacts = _files(ended.get("artifacts") or [])
    hyperparameters = _hyperparameters(started)
    has_hyperparameters = started.get("hyperparameters_json") not in (None, "", "{}")
    return {
        "run_id": started["run_id"],
        "experiment": started["experiment"],
        "experiment_id": experiment_id(started["experiment"]),
        "input_artifacts": {
            "base_model": {"name": started.get("base_model"), "source": started.get("base_model_source"),
                           "revision": started.get("base_model_revision"), "sha256": started.get("base_model_sha256"),
                           "adapter": json.loads(started["adapter_json"]) if started.get("adapter_json") else None},
            "dataset": {"path": started.get("dataset_path"), "version": started.get("dataset_version"),
                        "sha256": started.get("dataset_sha256"), "samples": started.get("dataset_samples"),
                        "format": started.get("dataset_format"), "source": started.get("dataset_source"),
                        "license": started.get("dataset_license"),
                        "preprocessing": list(started.get("dataset_preprocessing") or [])},
            "config": {"file": started.get("config_file"), "sha256": started.get("config_sha256"),
                       "git_commit": started.get("git_commit"), "git_dirty": started.get("git_dirty"),
                       "hyperparameters": hyperparameters,
                       "hyperparameters_sha256": sha256_of(started["hyperparameters_json"])
                       if has_hyperparameters else None},
        },
        "training_record": {
            "experiment_id": experiment_id(started["experiment"]), "experiment": started["experiment"],
            "run_id": started["run_id"], "run_name": started.get("run_name"), "user": started.get("user"),
            "team": started.get("team"), "tags": dict(started.get("tags") or {}),
            "started_at": iso_utc(started.get("ts")), "ended_at": iso_utc(ended.get("ts")),
            "duration_s": ended.get("duration_s"), "status": ended.get("status", "running"),
            "error": ended.get("error"), "total_steps": started.get("total_steps"),
            "completed_steps": ended.get("completed_steps"), "total_epochs": started.get("total_epochs"),
            "epochs": ended.get("epochs"),
            "checkpoints": _checkpoints(checkpoints),
            "metrics_summary": {"initial_loss": ended.get("initial_loss"), "final_loss": ended.get("final_loss"),
                                "best_eval_loss": ended.get("best_eval_loss"),
                                "best_checkpoint": ended.get("best_checkpoint")},
        },
        "output_artifacts": {
            "artifacts": artifacts,
            "training_args": _training_args(started, artifacts),
            "final_metrics": final_metrics,
            "gate_status": gates,
        },
        "reproducibility": {
            "seeds": {"seed": started.get("seed"), "data_seed": started.get("data_seed"),
                      "numpy_seed": started.get("numpy_seed")},
            "environment": dict(started.get("environment") or {}),
            "container_image_digest": started.get("container_image_digest"),
            "packages_sha256": started.get("packages_sha256"),
            "hardware": {"gpu_type": started.get("gpu_type"), "gpu_count": started.get("gpu_count"),
                         "gpu_driver_version": started.get("gpu_driver_version"),
                         "cuda_version": started.get("cuda_version"), "world_size": started.get("world_size"),
                         "host": started.get("host")},
            "determinism": {"cudnn_deterministic": started.get("cudnn_deterministic"),
                            "cudnn_benchmark": started.get("cudnn_benchmark"),
                            "deterministic_algorithms": started.get("deterministic_algorithms")},
        },
    }


def _hash_problem(name: str, value: Any) -> list[str]:
    if value in (None, ""):
        return [f"{name} (not computed)"]
    return [] if SHA256.match(str(value)) else [f"{name} (not sha256:<hex>: {value!r})"]


def missing_from_audit(record: dict[str, Any]) -> list[str]:
    """What G6 requires and the record lacks, each named by its place in the record. Empty when complete.

    Required: the base model's name and revision or hash; the dataset's hash and path or source; the config
    hashed (config file, else recorded hyperparameters) and versioned (a git commit, tree not dirty); the run ended
    with completed steps; output artifacts, each hashed; the training args hashed; checkpoint files hashed; a seed
    and the environment versions. Any hash that is present must be `sha256:<hex>`."""
    missing = [f"{section} (section)" for section in SECTIONS if not isinstance(record.get(section), dict)]
    if missing:
        return missing
    inputs, training = record["input_artifacts"], record["training_record"]
    outputs, repro = record["output_artifacts"], record["reproducibility"]
    model, dataset, config = inputs["base_model"], inputs["dataset"], inputs["config"]

    if not model.get("name"):
        missing.append("input_artifacts.base_model.name")
    if not (model.get("revision") or model.get("sha256")):
        missing.append("input_artifacts.base_model.revision or sha256 (base model not pinned)")
    if model.get("sha256"):
        missing += _hash_problem("input_artifacts.base_model.sha256", model["sha256"])
    missing += _hash_problem("input_artifacts.dataset.sha256", dataset.get("sha256"))
    source = (dataset.get("source") or "").strip()
    if source.lower() in DATASET_BUILDERS:
        missing.append(f"input_artifacts.dataset.source ({source!r} is the datasets builder that read the files, "
                       f"not where the data came from)")
    elif not (dataset.get("path") or source):
        missing.append("input_artifacts.dataset.path or source")
    if str(dataset.get("version") or "").strip().lower() in PLACEHOLDER_VERSIONS and dataset.get("version") is not None:
        missing.append(f"input_artifacts.dataset.version ({dataset['version']!r} is a placeholder, not a version)")
    if config.get("file") or config.get("sha256"):
        missing += _hash_problem("input_artifacts.config.sha256", config.get("sha256"))
    elif not config.get("hyperparameters_sha256"):
        missing.append("input_artifacts.config (no config file hash and no hyperparameters recorded)")
    if not config.get("git_commit"):
        missing.append("input_artifacts.config.git_commit (config not versioned)")
    elif config.get("git_dirty"):
        missing.append("input_artifacts.config.git_dirty (uncommitted changes: config not versioned)")

    if not training.get("ended_at"):
        missing.append("training_record.ended_at (no run ended event)")
    if training.get("completed_steps") is None:
        missing.append("training_record.completed_steps")
    for checkpoint in training.get("checkpoints", []):
        for file in checkpoint.get("files", []):
            missing += _hash_problem(f"training_record.checkpoints[step {checkpoint['step']}].{file['name']}.sha256",
                                     file.get("sha256"))

    if not outputs.get("artifacts"):
        missing.append("output_artifacts.artifacts (no output artifacts recorded)")
    for artifact in outputs.get("artifacts", []):
        missing += _hash_problem(f"output_artifacts.artifacts[{artifact['name']}].sha256", artifact.get("sha256"))
    missing += _hash_problem("output_artifacts.training_args.sha256", outputs.get("training_args", {}).get("sha256"))

    if repro["seeds"].get("seed") is None:
        missing.append("reproducibility.seeds.seed")
    if not repro.get("environment"):
        missing.append("reproducibility.environment (no versions recorded)")
    hardware = repro.get("hardware") or {}
    if not any(hardware.get(name) not in (None, "", 0) for name in ("gpu_type", "gpu_count", "world_size", "host")):
        missing.append("reproducibility.hardware (no GPU, world size or host recorded)")
    if repro.get("packages_sha256"):
        missing += _hash_problem("reproducibility.packages_sha256", repro["packages_sha256"])
    return missing
