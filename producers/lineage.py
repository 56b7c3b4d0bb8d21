"""Lineage of a run's inputs as RunStarted fields: the dataset, the base model and its adapter, the config file.

Hashes are `sha256:<hex>`. A dataset is hashed by content: a file as its bytes, a directory as its files' relative
paths and hashes in sorted order, in-memory data as a canonical serialisation of its rows in order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .environment import git_state, sha256_file

log = logging.getLogger(__name__)
_COUNTABLE = {".jsonl", ".json"}


def sha256_tree(path: Path, skip_hidden: bool = False) -> str:
    """A file's hash, or for a directory one hash over every file's relative path and hash, sorted by path
    (`skip_hidden`: leaving out what lies under a name starting with a dot, such as a download cache)."""
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for name, file in tree_files(path, skip_hidden):
        digest.update(f"{name}\0{sha256_file(file)}\n".encode())
    return f"sha256:{digest.hexdigest()}"


def tree_files(path: Path, skip_hidden: bool = False) -> list[tuple[str, Path]]:
    """(relative path, file) of every file under a directory, sorted by relative path."""
    files = ((f.relative_to(path).as_posix(), f) for f in path.rglob("*") if f.is_file())
    return sorted((name, f) for name, f in files
                  if not (skip_hidden and any(part.startswith(".") for part in name.split("/"))))


def canonical_row(row: Any) -> str:
    """One row as compact JSON with sorted keys; tensors and numpy values become lists and numbers."""
    return json.dumps(row, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_plain)


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):  # torch tensors, numpy arrays and scalars
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def sha256_rows(rows: Iterable[Any]) -> tuple[str, int]:
    """(hash, row count) of rows in order: equal for equal rows in equal order, different when either differs."""
    digest, count = hashlib.sha256(), 0
    for row in rows:
        digest.update(canonical_row(row).encode())
        digest.update(b"\n")  # JSON escapes newlines inside values, so this separates rows unambiguously
        count += 1
    return f"sha256:{digest.hexdigest()}", count


def count_samples(path: Path) -> int | None:
    """Records in a JSON Lines file or a JSON array file; None for anything else."""
    if not path.is_file() or path.suffix not in _COUNTABLE:
        return None
    with open(path, encoding="utf-8") as handle:
        if path.suffix == ".jsonl":
            return sum(1 for line in handle if line.strip())
        data = json.load(handle)
    return len(data) if isinstance(data, list) else None


def dataset_lineage(dataset: Any) -> dict[str, Any]:
    """RunStarted dataset fields for a path (file or directory) or map-style data (a list, a torch or datasets
    Dataset); {} for what cannot be read without consuming it (an iterable dataset)."""
    if isinstance(dataset, (str, Path)):
        path = Path(dataset)
        if not path.exists():
            raise FileNotFoundError(f"dataset {path} does not exist")
        suffixes = [path.suffix] if path.is_file() else sorted({f.suffix for f in path.rglob("*") if f.is_file()})
        return {"dataset_path": str(path), "dataset_sha256": sha256_tree(path),
                "dataset_samples": count_samples(path),
                "dataset_format": ",".join(s.lstrip(".") for s in suffixes if s) or None}
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        return {}
    started = time.monotonic()
    rows = dataset if isinstance(dataset, (list, tuple)) else (dataset[i] for i in range(len(dataset)))
    sha, count = sha256_rows(rows)
    log.info("trainwire: hashed %d dataset rows in %.1fs", count, time.monotonic() - started)
    first = dataset[0] if count else None
    fields = {"dataset_sha256": sha, "dataset_samples": count,
              "dataset_format": f"columns: {', '.join(sorted(first))}" if isinstance(first, dict) else None}
    return fields | _dataset_info(dataset)


def _dataset_info(dataset: Any) -> dict[str, Any]:
    """What a Hugging Face `datasets.Dataset` says about itself in its DatasetInfo. A dataset read from local files
    is named after the builder that read them (`json`, `csv`, …) with version 0.0.0: neither says where the data
    came from or which version it is, so neither is recorded."""
    info = getattr(dataset, "info", None)
    if info is None:
        return {}
    name = getattr(info, "dataset_name", None)
    if name and name == getattr(info, "builder_name", None):
        name = None
    version = str(getattr(info, "version", None) or "")
    found = {"dataset_license": getattr(info, "license", None) or None,
             "dataset_source": getattr(info, "homepage", None) or name or None,
             "dataset_version": version if version not in ("", "0.0.0") else None}
    return {k: v for k, v in found.items() if v}


def model_lineage(model: Any) -> dict[str, Any]:
    """Base model name/path, source and revision, and the adapter configs of a peft model as JSON."""
    peft_configs = getattr(model, "peft_config", None) or {}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    adapter = next(iter(peft_configs.values()), None)
    name = (getattr(adapter, "base_model_name_or_path", None) or getattr(config, "_name_or_path", None) or "")
    revision = getattr(config, "_commit_hash", None) or getattr(adapter, "revision", None)
    fields: dict[str, Any] = {
        "base_model": name or type(base).__name__,
        "base_model_source": ("local" if Path(name).exists() else "hub") if name else None,
        "base_model_revision": revision,
    }
    if peft_configs:
        fields["adapter_json"] = json.dumps({k: c.to_dict() for k, c in peft_configs.items()},
                                            sort_keys=True, default=_plain)
    return fields


def config_lineage(config_file: Path | None) -> dict[str, Any]:
    """The config file's path in the git repository holding it (else its name) and hash, and that repository's
    git state (or the working directory's)."""
    commit, dirty = git_state(config_file.parent if config_file else None)
    fields: dict[str, Any] = {"git_commit": commit, "git_dirty": dirty}
    if config_file is not None:
        fields.update(config_file=_path_in_repository(config_file) if commit else config_file.name,
                      config_sha256=sha256_file(config_file))
    return fields


def _path_in_repository(path: Path) -> str:
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=str(path.resolve().parent),
                             capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        return path.resolve().relative_to(Path(top).resolve()).as_posix()
    except (OSError, ValueError, subprocess.SubprocessError):
        return path.name
