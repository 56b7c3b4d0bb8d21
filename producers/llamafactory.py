"""LLaMA-Factory as a first-class trainer: `trainwire llamafactory train CONFIG.yaml [key=value …]`, and for
scripts `LlamaFactoryCallback`, a `TrainwireCallback` for `run_exp`:

    with LlamaFactoryCallback(args, experiment="sft-llama3", dataset_license="cc-by-4.0") as tw:
        run_exp(args=tw.args, callbacks=[tw])

Besides what the Trainer reports, it records all of LLaMA-Factory's arguments (model, data, fine-tuning,
generating) as hyperparameters; the config file's hash, or with arguments given as a dict their canonical JSON's;
the dataset files that `dataset` and `dataset_dir` name through dataset_info.json (path, SHA-256, rows) with the
template, cutoff length and other data arguments as its preprocessing; and a local base model directory's hash.

What cannot be discovered (the dataset's licence and source, tags, the experiment) comes as keywords, as the
command's options, or in a `trainwire:` section of the config file, which is taken out before LLaMA-Factory reads
it. Only this module imports LLaMA-Factory, and only when used.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .hf_callback import TrainwireCallback
from .llamafactory_lineage import arguments_sha256, base_model_fields, dataset_fields
from .values import representable

log = logging.getLogger(__name__)
TRAINWIRE_SECTION = "trainwire"
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
_SECRET_SUFFIXES = ("_token", "api_key", "secret", "password")


@dataclasses.dataclass
class LlamaFactoryArgs:
    """`run_exp`'s arguments as `llamafactory-cli train` reads them, and where they came from."""

    args: dict[str, Any] | list[str]
    config_file: Path | None = None
    overrides: list[str] = dataclasses.field(default_factory=list)


def read_args(argv: Sequence[str]) -> LlamaFactoryArgs:
    """As `llamafactory-cli train` reads its command line: a YAML or JSON config file merged with key=value
    overrides (OmegaConf's dot-list syntax), else the `--flag value` arguments as they are."""
    argv = list(argv)
    if not argv or not argv[0].endswith(CONFIG_SUFFIXES):
        return LlamaFactoryArgs(argv)
    path, overrides = Path(argv[0]), argv[1:]
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    if bad := [o for o in overrides if "=" not in o]:
        raise ValueError(f"{bad[0]!r} is not a key=value override of {path.name} "
                         "(trainwire's own options go before the config file)")
    from omegaconf import OmegaConf

    try:
        base = (OmegaConf.create(json.loads(path.read_text(encoding="utf-8"))) if path.suffix == ".json"
                else OmegaConf.load(path.absolute()))
        args = OmegaConf.to_container(OmegaConf.merge(base, OmegaConf.from_cli(overrides)))
    except Exception as err:  # OmegaConf and YAML errors share no base class
        raise ValueError(f"config file {path}: {err}") from None
    if not isinstance(args, dict):
        raise ValueError(f"config file {path}: expected a mapping of argument names to values")
    return LlamaFactoryArgs(args, path, overrides)


def trainwire_section(args: dict[str, Any] | list[str]) -> tuple[dict[str, Any] | list[str], dict[str, Any]]:
    """(LLaMA-Factory's arguments, the `trainwire:` section's keywords)."""
    if not isinstance(args, dict) or TRAINWIRE_SECTION not in args:
        return args, {}
    args = dict(args)
    section = args.pop(TRAINWIRE_SECTION) or {}
    if not isinstance(section, dict):
        raise ValueError(f"the {TRAINWIRE_SECTION!r} section of the config must be a mapping of keywords to values")
    return args, section


def llamafactory_arguments(args: dict[str, Any] | list[str]) -> dict[str, Any]:
    """LLaMA-Factory's model, data, fine-tuning and generating arguments, defaults filled in as it parses them
    (TrainingArguments are the callback's own); secrets (hub tokens, API keys) replaced by their names."""
    from llamafactory.hparams import DataArguments, FinetuningArguments, GeneratingArguments, ModelArguments
    from transformers import HfArgumentParser

    parser = HfArgumentParser([ModelArguments, DataArguments, FinetuningArguments, GeneratingArguments])
    if isinstance(args, dict):
        parsed = parser.parse_dict(args, allow_extra_keys=True)
    else:
        parsed = parser.parse_args_into_dataclasses(args=list(args), return_remaining_strings=True)[:-1]
    return {f.name: _redacted(f.name, getattr(group, f.name)) for group in parsed for f in dataclasses.fields(group)}


def _redacted(name: str, value: Any) -> Any:
    return f"<{name.upper()}>" if value is not None and name.endswith(_SECRET_SUFFIXES) else value


def input_lineage(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """RunStarted fields for the dataset files and a local base model directory (both hashed: disk speed)."""
    fields: dict[str, Any] = {}
    for what, probe in (("dataset", dataset_fields), ("base model", base_model_fields)):
        started = time.monotonic()
        try:
            found = probe(arguments) if probe is dataset_fields else probe(arguments.get("model_name_or_path"))
        except Exception as err:
            log.warning("trainwire: could not record the %s from LLaMA-Factory's arguments: %s", what, err)
            continue
        log.info("trainwire: %s lineage in %.1fs", what, time.monotonic() - started)
        fields |= found
    if fields.get("dataset_path"):
        fields["dataset_path"] = representable(fields["dataset_path"])
    return fields


def _merged(discovered: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """Keywords given win over those discovered (or those of the config's section); preprocessing steps and tags
    add to them."""
    merged = discovered | given
    if "dataset_preprocessing" in discovered and "dataset_preprocessing" in given:
        merged["dataset_preprocessing"] = list(dict.fromkeys(
            [*discovered["dataset_preprocessing"], *given["dataset_preprocessing"]]))
    if "tags" in discovered and "tags" in given:
        merged["tags"] = discovered["tags"] | given["tags"]
    return merged


def _global_rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


class LlamaFactoryCallback(TrainwireCallback):
    """A `TrainwireCallback` for LLaMA-Factory's `run_exp(args, callbacks)`. `args`: what `run_exp` takes (a dict,
    or `--flag value` strings), or None to read `CONFIG.yaml [key=value …]` from `sys.argv` as `llamafactory-cli
    train` does. Pass `tw.args` (without the `trainwire:` section) to `run_exp`. Other keywords are
    TrainwireCallback's (`dataset_source`, `dataset_license`, `tags`, `stop_on_block`, …); a `trainwire:` section
    in the config gives the same keywords, and those given here win. In a `with` block the run ends when the block
    does (after LLaMA-Factory's evaluation after training), or as failed when it raises."""

    def __init__(self, args: dict[str, Any] | list[str] | LlamaFactoryArgs | None = None,
                 experiment: str | None = None, run_name: str | None = None, **keywords: Any):
        read = args if isinstance(args, LlamaFactoryArgs) else (
            read_args(sys.argv[1:]) if args is None else LlamaFactoryArgs(args))
        self.args, section = trainwire_section(read.args)
        named = {"experiment": experiment, "run_name": run_name}
        given = _merged(section, keywords) | {k: v for k, v in named.items() if v is not None}
        config_file = given.pop("config_file", None) or read.config_file
        if config_file is None:
            given.setdefault("config_sha256", arguments_sha256(self.args))
        elif read.overrides:
            given["tags"] = {"config_overrides": " ".join(read.overrides), **(given.get("tags") or {})}
        self.arguments = self._parsed(self.args)
        super().__init__(config_file=config_file, **given)
        self.config_file = Path(config_file) if config_file else None  # never sys.argv's: the args are these
        self._lineage: Future | None = None
        if _global_rank() == 0:
            lineage_from = self.arguments or (self.args if isinstance(self.args, dict) else {})
            hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trainwire-lineage")
            self._lineage = hasher.submit(input_lineage, lineage_from)  # while LLaMA-Factory loads the model
            hasher.shutdown(wait=False)

    @staticmethod
    def _parsed(args: dict[str, Any] | list[str]) -> dict[str, Any]:
        try:
            return llamafactory_arguments(args)
        except Exception as err:  # LLaMA-Factory itself will say what is wrong with them
            log.warning("trainwire: could not read LLaMA-Factory's arguments (%s); recording those given", err)
            return {}

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        if state.is_world_process_zero and self._lineage is not None:
            lineage, self._lineage = self._lineage, None
            try:
                self.overrides = _merged(lineage.result(), self.overrides)
            except Exception as err:
                log.warning("trainwire: could not record the dataset and base model: %s", err)
        super().on_train_begin(args, state, control, **kwargs)

    def _hyperparameters(self, args) -> dict[str, Any]:
        given = self.args if isinstance(self.args, dict) and not self.arguments else {}
        return super()._hyperparameters(args) | given | self.arguments

    def summary(self) -> dict[str, Any] | None:
        """The run's id, experiment, status and steps, in the process that recorded it (else None)."""
        if self.run is None or self._state is None:
            return None
        state = self._state
        done = state.global_step >= state.max_steps and not self.run.should_stop
        return {"run_id": self.run.run_id, "experiment": self.run.experiment,
                "status": "completed" if done else "stopped", "completed_steps": state.global_step}


def run_exp(args: dict[str, Any] | list[str] | LlamaFactoryArgs | None = None, callbacks: list | None = None,
            **keywords: Any) -> LlamaFactoryCallback:
    """LLaMA-Factory's `run_exp`, recorded. The run ends when training has ended and `save_model` has written the
    final adapter (its output artifacts); LLaMA-Factory's evaluation after training is the run's post-training
    record. Training that raises ends the run as failed, with the error (Ctrl-C: stopped)."""
    from llamafactory.train.tuner import run_exp as llamafactory_run_exp

    callback = LlamaFactoryCallback(args, **keywords)
    try:
        llamafactory_run_exp(args=callback.args, callbacks=[*(callbacks or []), callback])
    except KeyboardInterrupt:
        callback.finish("stopped", error="KeyboardInterrupt")  # nothing, if the run has ended already
        raise
    except Exception as err:
        callback.finish("failed", error=f"{type(err).__name__}: {err}")
        raise
    return callback


def _enabled(env: Mapping[str, str], name: str, default: str = "0") -> bool:
    return env.get(name, default).lower() in ("true", "y", "1")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def torchrun_command(argv: Sequence[str], env: Mapping[str, str], device_count: int,
                     free_port=_free_port) -> tuple[list[str], dict[str, str]] | None:
    """The torchrun command (and its environment) that runs `trainwire ARGV` on every device, when
    `llamafactory-cli train` would launch torchrun: `FORCE_TORCHRUN` (or `USE_MCA`) set, or more than one device
    without Ray or KTransformers; None to train in this process (also when already launched by torchrun). Reads
    the same variables: NNODES, NODE_RANK, NPROC_PER_NODE, MASTER_ADDR, MASTER_PORT, RDZV_ID (elastic, with
    MIN_NNODES, MAX_NNODES, MAX_RESTARTS) and OPTIM_TORCH."""
    if "LOCAL_RANK" in env or "TORCHELASTIC_RUN_ID" in env:
        return None
    force = _enabled(env, "FORCE_TORCHRUN") or _enabled(env, "USE_MCA")
    if not (force or (device_count > 1 and not _enabled(env, "USE_RAY") and not _enabled(env, "USE_KT"))):
        return None
    env = dict(env)
    if _enabled(env, "USE_MCA"):
        env["FORCE_TORCHRUN"] = "1"
    nnodes, nproc = env.get("NNODES", "1"), env.get("NPROC_PER_NODE", str(device_count))
    master_addr, master_port = env.get("MASTER_ADDR", "127.0.0.1"), env.get("MASTER_PORT") or str(free_port())
    if _enabled(env, "OPTIM_TORCH", "1"):
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
        env["TORCH_NCCL_AVOID_RECORD_STREAMS"] = "1"
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    if env.get("RDZV_ID") is not None:
        rdzv_nnodes = (f"{env['MIN_NNODES']}:{env['MAX_NNODES']}" if env.get("MIN_NNODES") and env.get("MAX_NNODES")
                       else nnodes)
        torchrun += ["--nnodes", rdzv_nnodes, "--nproc-per-node", nproc, "--rdzv-id", env["RDZV_ID"],
                     "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{master_addr}:{master_port}",
                     "--max-restarts", env.get("MAX_RESTARTS", "0")]
    else:
        torchrun += ["--nnodes", nnodes, "--node_rank", env.get("NODE_RANK", "0"), "--nproc_per_node", nproc,
                     "--master_addr", master_addr, "--master_port", master_port]
    return [*torchrun, "-m", "trainwire", *argv], env


def device_count() -> int:
    """Accelerators as LLaMA-Factory counts them (CUDA, NPU, XPU, MPS)."""
    from llamafactory.extras.misc import get_device_count

    return get_device_count()
