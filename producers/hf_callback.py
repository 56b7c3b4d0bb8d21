"""Hugging Face `TrainerCallback` (also what LLaMA-Factory trainers take): one line in a training script.

    trainer = Trainer(..., callbacks=[TrainwireCallback(experiment="sft-llama3")])
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from trainwire.infra.config import Settings

from .environment import environment_versions, git_state, sha256_file
from .run import Run
from .session import init

log = logging.getLogger(__name__)
_STEP_KEYS = {"loss", "learning_rate", "grad_norm", "epoch"}
_SKIP_KEYS = {"total_flos", "train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss"}


def _numeric(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    item = getattr(value, "item", None)  # a 0-d tensor
    return float(item()) if callable(item) else None


class TrainwireCallback(TrainerCallback):
    def __init__(self, experiment: str | None = None, run_name: str | None = None, *,
                 settings: Settings | None = None, team: str | None = None, sample_gpus: bool = True,
                 config_file: str | Path | None = None, dataset_path: str | Path | None = None,
                 run_id: str | None = None):
        self.experiment = experiment
        self.run_name = run_name
        self.settings = settings
        self.team = team
        self.sample_gpus = sample_gpus
        self.config_file = Path(config_file) if config_file else None
        self.dataset_path = Path(dataset_path) if dataset_path else None
        self.run_id = run_id
        self.run: Run | None = None
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trainwire-hash")
        self._last_tokens: tuple[float, int] | None = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model=None, **kwargs) -> None:
        if not state.is_world_process_zero:
            return
        commit, dirty = git_state(self.config_file.parent if self.config_file else None)
        fields: dict[str, Any] = {
            "seed": args.seed, "data_seed": args.data_seed, "total_steps": state.max_steps or None,
            "total_epochs": float(args.num_train_epochs), "environment": environment_versions(),
            "git_commit": commit, "git_dirty": dirty,
        }
        if model is not None:
            base = getattr(getattr(model, "config", None), "_name_or_path", None)
            fields["base_model"] = base or type(model).__name__
        if self.config_file:
            fields["config_file"] = self.config_file.name
            fields["config_sha256"] = sha256_file(self.config_file)
        if self.dataset_path and self.dataset_path.is_file():
            fields["dataset_path"] = str(self.dataset_path)
            fields["dataset_sha256"] = sha256_file(self.dataset_path)
        self.run = init(
            self.experiment or Path(args.output_dir).name,
            self.run_name or args.run_name or "",
            {k: v for k, v in args.to_dict().items() if not k.startswith("_")},
            settings=self.settings, team=self.team, run_id=self.run_id, sample_gpus=self.sample_gpus, **fields,
        )

    def on_log(self, args, state: TrainerState, control, logs: dict | None = None, **kwargs) -> None:
        if self.run is None or not logs or "loss" not in logs:
            return
        extra = {k: v for k, v in ((k, _numeric(v)) for k, v in logs.items()
                                   if k not in _STEP_KEYS and k not in _SKIP_KEYS) if v is not None}
        self.run.log_step(
            state.global_step, loss=_numeric(logs.get("loss")), learning_rate=_numeric(logs.get("learning_rate")),
            grad_norm=_numeric(logs.get("grad_norm")), tokens_per_s=self._tokens_per_s(state),
            epoch=_numeric(logs.get("epoch")), tokens=getattr(state, "num_input_tokens_seen", None) or None,
            **extra,
        )

    def _tokens_per_s(self, state: TrainerState) -> float | None:
        import time

        seen = getattr(state, "num_input_tokens_seen", 0) or 0
        now = time.monotonic()
        previous, self._last_tokens = self._last_tokens, (now, seen)
        if previous is None or not seen or now <= previous[0]:
            return None
        return (seen - previous[1]) / (now - previous[0])

    def on_evaluate(self, args, state: TrainerState, control, metrics: dict | None = None, **kwargs) -> None:
        if self.run is None or not metrics:
            return
        values = {k.removeprefix("eval_"): _numeric(v) for k, v in metrics.items()}
        eval_loss = values.pop("loss", None)
        accuracy = values.pop("accuracy", None)
        runtime = values.pop("runtime", None)
        for key in ("samples_per_second", "steps_per_second", "epoch"):
            values.pop(key, None)
        self.run.log_eval(state.global_step, eval_loss=eval_loss, eval_accuracy=accuracy, runtime_s=runtime,
                          epoch=state.epoch, **{k: v for k, v in values.items() if v is not None})

    def on_save(self, args: TrainingArguments, state: TrainerState, control, **kwargs) -> None:
        if self.run is None:
            return
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        eval_loss = next((h["eval_loss"] for h in reversed(state.log_history) if "eval_loss" in h), None)
        # hashing gigabytes of weights must not stall training: do it on the hasher thread
        self._hasher.submit(self._log_checkpoint, state.global_step, path, eval_loss)

    def _log_checkpoint(self, step: int, path: Path, eval_loss: float | None) -> None:
        files = [{"name": str(f.relative_to(path)), "size": f.stat().st_size, "sha256": sha256_file(f)}
                 for f in sorted(path.rglob("*")) if f.is_file()]
        self.run.log_checkpoint(step, path, files, eval_loss)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control, **kwargs) -> None:
        if self.run is None:
            return
        self._hasher.shutdown(wait=True)
        self.run.finish("completed")
