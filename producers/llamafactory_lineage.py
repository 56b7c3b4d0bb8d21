"""What LLaMA-Factory's arguments say about a run's inputs, as RunStarted fields.

The dataset is read the way LLaMA-Factory reads it: each name in `dataset` is looked up in `dataset_dir`'s
dataset_info.json, whose entry names a local file or folder (hashed, rows counted) or a hub dataset (its source).
A local base model directory is hashed over its files. Arguments given as a dict (no config file) are hashed as
canonical JSON. Pure Python: needs neither LLaMA-Factory nor transformers.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .lineage import canonical_row, sha256_tree

DATASET_INFO = "dataset_info.json"
# Data arguments that change what the model is trained on, recorded as the dataset's preprocessing when set.
SHAPING_ARGUMENTS = ("template", "cutoff_len", "train_on_prompt", "mask_history", "packing", "neat_packing",
                     "max_samples", "val_size", "mix_strategy", "interleave_probs", "streaming", "tool_format",
                     "default_system", "tokenized_path")
_HUB_PREFIXES = {"hf_hub_url": "hf", "ms_hub_url": "ms", "om_hub_url": "om"}


@dataclass(frozen=True)
class DatasetEntry:
    """One name of `dataset`, resolved: a local path (file or folder) or where it is fetched from."""

    name: str
    entry: dict[str, Any] = field(default_factory=dict)  # its dataset_info.json entry
    path: Path | None = None
    source: str | None = None

    @property
    def formatting(self) -> str:
        return self.entry.get("formatting", "alpaca")


def _names(dataset: str | list[str] | None) -> list[str]:
    if dataset is None:
        return []
    names = dataset.split(",") if isinstance(dataset, str) else list(dataset)
    return [name.strip() for name in names if name.strip()]


def _enabled(variable: str) -> bool:
    return os.environ.get(variable, "0").lower() in ("true", "y", "1")


def _dataset_info(dataset_dir: str) -> Mapping | None:
    if dataset_dir == "ONLINE":
        return None
    path = Path(dataset_dir, DATASET_INFO)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {path}: {err}") from None


def _hub_source(entry: Mapping) -> str:
    """The hub LLaMA-Factory loads from: ModelScope or Modelers when asked for (or the only one), else Hugging Face."""
    has = {key: key in entry for key in _HUB_PREFIXES}
    if has["ms_hub_url"] and (_enabled("USE_MODELSCOPE_HUB") or not has["hf_hub_url"]):
        key = "ms_hub_url"
    elif has["om_hub_url"] and (_enabled("USE_OPENMIND_HUB") or not has["hf_hub_url"]):
        key = "om_hub_url"
    else:
        key = "hf_hub_url"
    return f"{_HUB_PREFIXES[key]}:{entry[key]}"


def resolve_datasets(dataset: str | list[str] | None, dataset_dir: str = "data") -> list[DatasetEntry]:
    """Each dataset name as LLaMA-Factory resolves it through `dataset_dir`/dataset_info.json (`ONLINE`: every name
    is a hub dataset; `REMOTE:repo`: defined in a hub repository's dataset_info.json). ValueError for a name the
    file does not define."""
    names = _names(dataset)
    if not names:
        return []
    if dataset_dir.startswith("REMOTE:"):
        return [DatasetEntry(name, source=f"hf:{dataset_dir.removeprefix('REMOTE:')}/{DATASET_INFO}#{name}")
                for name in names]
    info = _dataset_info(dataset_dir)
    if info is None:
        prefix = "ms" if _enabled("USE_MODELSCOPE_HUB") else "om" if _enabled("USE_OPENMIND_HUB") else "hf"
        return [DatasetEntry(name, source=f"{prefix}:{name}") for name in names]
    entries = []
    for name in names:
        if name not in info:
            raise ValueError(f"dataset {name!r} is not defined in {Path(dataset_dir, DATASET_INFO)}")
        entry = dict(info[name])
        if any(key in entry for key in _HUB_PREFIXES):
            entries.append(DatasetEntry(name, entry, source=_hub_source(entry)))
        elif "script_url" in entry:
            entries.append(DatasetEntry(name, entry, path=Path(dataset_dir, entry["script_url"])))
        elif "cloud_file_name" in entry:
            entries.append(DatasetEntry(name, entry, source=entry["cloud_file_name"]))
        else:
            entries.append(DatasetEntry(name, entry, path=Path(dataset_dir, entry["file_name"])))
    return entries


def count_rows(path: Path) -> int | None:
    """Records in a data file (JSON array or JSON Lines, CSV, Parquet) or a folder of them; None when unknown."""
    if path.is_dir():
        counts = [count_rows(file) for file in sorted(path.iterdir()) if file.is_file()]
        return sum(counts) if counts and None not in counts else None
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except ValueError:  # JSON Lines, which the datasets json builder also reads from a .json file
            return sum(1 for line in text.splitlines() if line.strip())
        return len(data) if isinstance(data, list) else 1
    if suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as handle:
            return max(sum(1 for _ in csv.reader(handle)) - 1, 0)
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as parquet
        except ImportError:
            return None
        return parquet.ParquetFile(path).metadata.num_rows
    return None


def _file_formats(entries: list[DatasetEntry]) -> str | None:
    formats = []
    for entry in entries:
        suffixes = ([entry.path.suffix] if entry.path.is_file() else sorted(
            {f.suffix for f in entry.path.iterdir() if f.is_file()})) if entry.path else []
        kind = ",".join(s.lstrip(".").lower() for s in suffixes if s) or "hub"
        formats.append(f"{entry.formatting} {kind}")
    return ", ".join(dict.fromkeys(formats)) or None


def _combined_sha256(digests: list[tuple[str, str]]) -> str:
    """One hash over (name, hash) pairs sorted by name, as `sha256_tree` hashes a folder."""
    digest = hashlib.sha256()
    for name, sha in sorted(digests):
        digest.update(f"{name}\0{sha}\n".encode())
    return f"sha256:{digest.hexdigest()}"


def preprocessing(arguments: Mapping[str, Any], entries: list[DatasetEntry]) -> list[str]:
    """The data arguments that shape what is trained on (`template=…`, `cutoff_len=…`, …) and each dataset's
    dataset_info.json entry (its columns, formatting, sampling)."""
    mixing = ("mix_strategy", "interleave_probs") if len(entries) < 2 else ()  # how several datasets are mixed
    steps = [f"{key}={arguments[key]}" for key in SHAPING_ARGUMENTS
             if arguments.get(key) not in (None, False, "", 0, []) and key not in mixing]
    return steps + [f"dataset_info[{e.name}]={canonical_row(e.entry)}" for e in entries if e.entry]


def dataset_fields(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """RunStarted dataset fields from LLaMA-Factory's data arguments. The files' hash when every dataset is local:
    one file's SHA-256 (what `sha256sum` prints), a folder's as `sha256_tree`, several as one hash over their
    (path relative to `dataset_dir`, hash) pairs; else no hash (the callback then hashes the tokenised rows)."""
    tokenized = arguments.get("tokenized_path")
    if tokenized and Path(tokenized).is_dir() and any(Path(tokenized).iterdir()):
        # LLaMA-Factory loads a saved tokenised dataset from here and reads no dataset file
        return {"dataset_path": str(Path(tokenized).resolve()), "dataset_sha256": sha256_tree(Path(tokenized)),
                "dataset_format": "tokenized (datasets save_to_disk)",
                "dataset_preprocessing": preprocessing(arguments, [])}
    dataset_dir = arguments.get("dataset_dir") or "data"
    entries = resolve_datasets(arguments.get("dataset"), dataset_dir)
    if not entries:
        return {}
    local = [e for e in entries if e.path is not None]
    fields: dict[str, Any] = {"dataset_format": _file_formats(entries),
                              "dataset_preprocessing": preprocessing(arguments, entries)}
    sources = [e.source for e in entries if e.source]
    if sources:
        fields["dataset_source"] = ",".join(sources)
    if local:
        fields["dataset_path"] = ",".join(str(e.path.resolve()) for e in local)
    if local and len(local) == len(entries):
        digests = [(e.path.relative_to(dataset_dir).as_posix(), sha256_tree(e.path)) for e in local]
        fields["dataset_sha256"] = digests[0][1] if len(digests) == 1 else _combined_sha256(digests)
        rows = [count_rows(e.path) for e in local]
        fields["dataset_samples"] = sum(rows) if None not in rows else None
    return fields


def base_model_fields(model_name_or_path: str | None) -> dict[str, Any]:
    """A local base model directory's hash over its files (hidden ones, such as a download cache, left out)."""
    if not model_name_or_path or not Path(model_name_or_path).is_dir():
        return {}
    return {"base_model_sha256": sha256_tree(Path(model_name_or_path), skip_hidden=True)}


def arguments_sha256(arguments: Mapping[str, Any] | list[str]) -> str:
    """SHA-256 of arguments as canonical JSON: sorted keys, no whitespace, UTF-8 (`json.dumps(arguments,
    sort_keys=True, separators=(",", ":"), ensure_ascii=False)`)."""
    return f"sha256:{hashlib.sha256(canonical_row(arguments).encode()).hexdigest()}"
