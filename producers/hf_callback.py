"""Hugging Face `TrainerCallback` (also what LLaMA-Factory trainers take): one line in a training script.

    trainer = Trainer(..., callbacks=[TrainwireCallback(experiment="sft-llama3")])

When training ends, the run ends with the final adapter as its output artifacts: the files of the trained model's
first save after training (`trainer.save_model(out)`, which Trainer calls no callback for: the callback wraps the
model's `save_pretrained` once training has ended), else those of the last checkpoint. Without a save, the run ends
at the Trainer's next event (an evaluation, another training), END_GRACE_S after training, or at the process's exit,
whichever comes first. Used as a context manager, the run ends when the block exits instead: training that raises
(Trainer then calls no callback) ends the run as failed, and `log_artifacts` names the output artifacts:

    with TrainwireCallback(experiment="sft-llama3") as tw:
        trainer = Trainer(..., callbacks=[tw])
        trainer.train()
        trainer.save_model(out)
        tw.log_artifacts(out)

Under the Trainer's defaults the callback turns `logging_nan_inf_filter` off (it logs a NaN/Inf loss as a finite
stand-in), counts the tokens trained on for `tokens_per_s` (a forward pre-hook; the Trainer counts none by default),
and marks the checkpoints that `save_total_limit` rotated away as deleted. In multi-process training with the stop
switch, rank 0 broadcasts the stop decision at every step's end, so that every rank stops at the same step.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from trainwire.infra.config import Settings, load_settings
from trainwire.schemas import Event, RunStarted

from .environment import (
    container_image_digest, current_user, determinism_flags, environment_versions, hardware, packages_sha256,
    prefetch_packages, sha256_file,
)
from .gpu import GpuSampler
from .lineage import config_lineage, dataset_lineage, model_lineage
from .run import Run
from .session import emitter_for, init
from .stop_sync import RankStopSync
from .token_counter import TokenCounter
from .values import InvalidRunError

log = logging.getLogger(__name__)
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin", "adapter_config.json", "training_args.bin")
_CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
_RUN_ID_NAMESPACE = uuid.UUID("6f1c8e4a-2b1d-4c55-9a0e-7d3f1b2a9c10")
_STEP_KEYS = {"loss", "learning_rate", "grad_norm", "epoch"}
_SKIP_KEYS = {"total_flos", "train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss"}
END_GRACE_S = 5.0  # after training, how long the run waits for a save of the final adapter (outside a `with` block)


def _numeric(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    item = getattr(value, "item", None)  # a 0-d tensor
    return float(item()) if callable(item) else None


def shared_run_id(run_id: str | None = None) -> str:
    """The one run id of every process of a job; call it on every rank (it is a collective when distributed).

    Rank 0 decides (`run_id`, else a new UUID) and broadcasts. Without an initialised process group, ranks
    launched by torchrun agree through its rendezvous id (`TORCHELASTIC_RUN_ID`); other launchers need `run_id`."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [run_id or str(uuid.uuid4())] if dist.get_rank() == 0 else [None]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    elastic = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if run_id is None and elastic != "none" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return str(uuid.uuid5(_RUN_ID_NAMESPACE, elastic))
    return run_id or str(uuid.uuid4())


def _safely(what: str, probe, *args) -> dict[str, Any]:
    """Telemetry never stops training: a probe that fails leaves its fields out, with a warning."""
    try:
        return probe(*args)
    except Exception:
        log.warning("trainwire: could not record the %s; its fields stay empty", what, exc_info=True)
        return {}


def _config_from_argv() -> Path | None:
    """LLaMA-Factory's (and HfArgumentParser's) convention: the config file is `sys.argv[1]`."""
    if len(sys.argv) > 1 and sys.argv[1].endswith(_CONFIG_SUFFIXES) and Path(sys.argv[1]).is_file():
        return Path(sys.argv[1])
    return None


def _environment() -> dict[str, Any]:
    return {"environment": environment_versions(), "container_image_digest": container_image_digest(),
            "packages_sha256": packages_sha256(), **determinism_flags(), **hardware()}


def _digest(path: Path, name: str) -> dict[str, Any]:
    return {"name": name, "size": path.stat().st_size, "sha256": sha256_file(path)}


def _listing(directory: Path) -> dict[Path, tuple[int, int, int]]:
    """The directory's top-level files, each with what tells a rewrite: (inode, size, mtime in ns). Empty when it
    cannot be read."""
    found = {}
    try:
        for path in directory.iterdir() if directory.is_dir() else ():
            if path.is_file():
                stat = path.stat()
                found[path] = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    except OSError as err:
        log.warning("trainwire: cannot list %s: %s", directory, err)
    return found


class TrainwireCallback(TrainerCallback):
    """Records a Trainer run: run started with its lineage, steps, evals, checkpoints, run ended.

    `dataset`: a path (file or directory, hashed) or map-style rows (hashed row by row); by default the Trainer's
    train dataset. `config_file`: by default `sys.argv[1]` when it is a .yaml/.yml/.json file. `stop_on_block`:
    opt in to the stop switch: a block-severity alert (e.g. a NaN loss) ends training after a final checkpoint
    (docs/stop-switch.md). Any other keyword is a RunStarted field for what the Trainer cannot know
    (`dataset_source`, `dataset_license`, `tags`, …)."""

    def __init__(self, experiment: str | None = None, run_name: str | None = None, *,
                 settings: Settings | None = None, team: str | None = None, sample_gpus: bool = True,
                 config_file: str | Path | None = None, dataset: Any = None, run_id: str | None = None,
                 stop_on_block: bool = False, **run_started: Any):
        unknown = sorted(set(run_started) - (set(RunStarted.model_fields) - set(Event.model_fields)))
        if unknown:
            raise TypeError(f"TrainwireCallback got unknown run started fields: {', '.join(unknown)}")
        prefetch_packages()  # read while the model and data load, not at train begin
        self.experiment = experiment
        self.run_name = run_name
        self.settings = settings
        self.team = team
        self.sample_gpus = sample_gpus
        self.config_file = Path(config_file) if config_file else _config_from_argv()
        self.dataset = dataset
        self.run_id = run_id
        self.stop_on_block = stop_on_block
        self.overrides = run_started
        self.run: Run | None = None
        self._main = True  # until training begins, this process may be the one that owns the run
        self._state: TrainerState | None = None
        self._status: str | None = None
        self._in_block = False
        self._ended = False
        self._hasher: ThreadPoolExecutor | None = None
        self._last_checkpoint: tuple[Path, list[dict]] | None = None
        self._artifacts: list[dict] = []
        self._gpu_only: tuple[GpuSampler, Any, float] | None = None
        self._last_tokens: tuple[float, int] | None = None
        self._tokens: TokenCounter | None = None
        self._world_size = 1
        self._recorded: dict[Path, int] = {}  # checkpoints recorded and still on disk, by path: their step
        self._saved: list[dict] = []  # the files of the trained model's save after training
        self._watched: Any = None  # the trained model, while its save_pretrained is wrapped
        self._grace: threading.Timer | None = None
        self._ending = threading.Lock()
        self._synced_stop: RankStopSync | None = None  # multi-process with the stop switch

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model=None, train_dataloader=None, **kwargs) -> None:
        if self._status is not None:  # a previous training with this callback whose run has not ended yet
            self.finish(self._status)
        run_id = shared_run_id(self.run_id)
        self._main, self._state, self._status, self._ended = state.is_world_process_zero, state, None, False
        self._last_checkpoint, self._artifacts, self._saved, self._recorded = None, [], [], {}
        self._show_non_finite_losses(args)
        self._synced_stop = RankStopSync.for_run(args.world_size, self._main) if self.stop_on_block else None
        if not self._main:
            if state.is_local_process_zero and self.sample_gpus:
                self._sample_gpus_only(args, run_id)
            return
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trainwire-hash")
        self.run = self._start(args, run_id, self._run_started(args, state, model, train_dataloader))
        self._count_tokens(args, state, model)

    def _show_non_finite_losses(self, args: TrainingArguments) -> None:
        """With `logging_nan_inf_filter` on (the default), the Trainer logs a NaN/Inf loss as a finite stand-in, so
        `loss_not_finite` could never fire: turn it off (on every rank), and say so. Only the logs change."""
        if not args.logging_nan_inf_filter:
            return
        args.logging_nan_inf_filter = False
        if self._main:
            log.warning("trainwire: TrainingArguments.logging_nan_inf_filter turned off, so that a NaN or Inf loss is "
                        "logged as it is (the filter logs it as a finite stand-in, and loss_not_finite never fires)")

    def _count_tokens(self, args: TrainingArguments, state: TrainerState, model) -> None:
        """Tokens for `tokens_per_s`: the Trainer's count when it keeps one (`include_num_input_tokens_seen`),
        else this process's, counted from the model's inputs, times the number of processes."""
        self._world_size = max(args.world_size, 1)
        counting = getattr(args, "include_num_input_tokens_seen", False) not in (False, "no", None)
        self._tokens = None if counting or model is None else TokenCounter(model)
        self._last_tokens = (time.monotonic(), self._tokens_seen(state))

    def _start(self, args: TrainingArguments, run_id: str, fields: dict[str, Any]) -> Run:
        """`init`, leaving out a field gathered from the environment that run started cannot hold (with a warning):
        what the Trainer or a probe found must not stop training. What the caller gave is refused (raised)."""
        while True:
            try:
                return init(
                    self._experiment(args), self.run_name or args.run_name or "", self._hyperparameters(args),
                    settings=self.settings, team=self.team, run_id=run_id, sample_gpus=self.sample_gpus,
                    rank=args.process_index, stop_on_block=self._stop_switch(args), **fields,
                )
            except InvalidRunError as err:
                gathered = [name for name in err.fields if name in fields and name not in self.overrides]
                if not gathered or len(gathered) < len(err.fields):
                    raise
                log.warning("trainwire: run started recorded without %s: %s", ", ".join(gathered), err)
                for name in gathered:
                    del fields[name]

    def _hyperparameters(self, args: TrainingArguments) -> dict[str, Any]:
        """The run's hyperparameters: the `TrainingArguments` (a trainer's own arguments may add to them)."""
        return {k: v for k, v in args.to_dict().items() if not k.startswith("_")}

    def _stop_switch(self, args: TrainingArguments) -> bool:
        # only rank 0 hears the command: without the broadcast, stopping it alone would leave the others hanging
        return self.stop_on_block and (args.world_size <= 1 or self._synced_stop is not None)

    def _experiment(self, args: TrainingArguments) -> str:
        return self.experiment or Path(args.output_dir).name

    def _run_started(self, args: TrainingArguments, state: TrainerState, model, train_dataloader) -> dict:
        fields: dict[str, Any] = {
            "user": current_user(), "seed": args.seed, "data_seed": args.data_seed,
            "numpy_seed": args.seed,  # Trainer seeds numpy's global generator with args.seed (transformers.set_seed)
            "world_size": args.world_size, "total_steps": state.max_steps or None,
            "total_epochs": float(state.num_train_epochs or args.num_train_epochs),
        }
        fields |= _safely("environment", _environment)
        fields |= _safely("config file and git state", config_lineage, self.config_file)
        if model is not None:
            fields |= _safely("base model", model_lineage, model)
        dataset = self.dataset if self.dataset is not None else getattr(train_dataloader, "dataset", None)
        if dataset is not None and "dataset_sha256" not in self.overrides:  # given: nothing to hash
            fields |= _safely("dataset", dataset_lineage, dataset)
        return fields | self.overrides

    def _sample_gpus_only(self, args: TrainingArguments, run_id: str) -> None:
        """A node's local rank 0 that is not global rank 0 samples its node's GPUs into the shared run."""
        settings = self.settings or load_settings()
        emitter = emitter_for(settings)
        # never started, so it emits no run events: only the samples, keyed by (host, rank) in the store
        run = Run(emitter, experiment=self._experiment(args), run_id=run_id, sample_gpus=False,
                  team=settings.team if self.team is None else self.team)
        sampler = GpuSampler(run.log_gpu, settings.gpu_sample_seconds, args.process_index)
        if sampler.start():
            self._gpu_only = (sampler, emitter, settings.flush_timeout_seconds)

    def _stop_gpu_only(self) -> None:
        if self._gpu_only is not None:
            sampler, emitter, timeout = self._gpu_only
            self._gpu_only = None
            sampler.stop()
            emitter.flush(timeout)

    def on_step_end(self, args, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if self._synced_stop is not None:
            self._stop_where_rank_zero_was_told(state, control)
        elif self.run is not None and self.run.should_stop:
            self._stop(state, control)

    def _stop_where_rank_zero_was_told(self, state: TrainerState, control: TrainerControl) -> None:
        """Every rank stops at the same step: rank 0, the one process that hears the stop switch, says at each
        step's end whether its run was told to stop."""
        if self._synced_stop.told(self.run is not None and self.run.should_stop):
            self._stop(state, control)

    def _stop(self, state: TrainerState, control: TrainerControl) -> None:
        """Told to stop: save a final checkpoint (the Trainer saves before it checks for the stop), then stop."""
        if control.should_training_stop:
            return
        if self.run is not None:
            log.warning("trainwire: stopping training at step %d after a final checkpoint: %s", state.global_step,
                        self.run.stop_reason)
        control.should_save = True
        control.should_training_stop = True

    def on_log(self, args, state: TrainerState, control, logs: dict | None = None, **kwargs) -> None:
        self._end_after_training()
        if self._synced_stop is None and self.run is not None and self.run.should_stop:
            self._stop(state, control)
        if self.run is None or not logs or "loss" not in logs:
            return
        extra = {k: v for k, v in ((k, _numeric(v)) for k, v in logs.items()
                                   if k not in _STEP_KEYS and k not in _SKIP_KEYS) if v is not None}
        tokens, tokens_per_s = self._throughput(state)
        self.run.log_step(
            state.global_step, loss=_numeric(logs.get("loss")), learning_rate=_numeric(logs.get("learning_rate")),
            grad_norm=_numeric(logs.get("grad_norm")), tokens_per_s=tokens_per_s,
            epoch=_numeric(logs.get("epoch")), tokens=tokens, **extra,
        )

    def _tokens_seen(self, state: TrainerState) -> int:
        if self._tokens is not None:
            return self._tokens.read() * self._world_size
        return getattr(state, "num_input_tokens_seen", 0) or 0

    def _throughput(self, state: TrainerState) -> tuple[int | None, float | None]:
        """Tokens seen so far, and tokens per second since the previous logging step (or training's start)."""
        seen = self._tokens_seen(state)
        now = time.monotonic()
        previous, self._last_tokens = self._last_tokens, (now, seen)
        if previous is None or not seen or now <= previous[0]:
            return seen or None, None
        return seen, (seen - previous[1]) / (now - previous[0])

    def on_evaluate(self, args, state: TrainerState, control, metrics: dict | None = None, **kwargs) -> None:
        self._end_after_training()
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
        files = []
        for file in sorted(path.rglob("*")):
            try:
                if file.is_file():
                    files.append(_digest(file, str(file.relative_to(path))))
            except OSError as err:  # e.g. rotated away by save_total_limit while we hashed
                log.warning("trainwire: checkpoint file %s left out: %s", file, err)
        self._last_checkpoint = (path, files)
        self.run.log_checkpoint(step, path, files, eval_loss)
        self._recorded[path] = step
        self._mark_deleted_checkpoints()

    def _mark_deleted_checkpoints(self) -> None:
        """Checkpoints recorded earlier and gone from disk since (rotated away by `save_total_limit`, or by the
        Trainer at the end of training) get a checkpoint event marking them deleted. On the hasher thread, or
        once it is shut down."""
        for path, step in list(self._recorded.items()):
            if not path.exists():
                del self._recorded[path]
                self.run.log_checkpoint_deleted(step, path)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control, model=None, **kwargs) -> None:
        self._stop_gpu_only()
        self._stop_counting_tokens()
        if self.run is None:
            return
        self._status = "completed" if state.global_step >= state.max_steps else "stopped"
        self._watch_final_save(model)
        if not self._in_block:
            atexit.register(self._end_after_training)
            self._grace = threading.Timer(END_GRACE_S, self._end_after_training)
            self._grace.daemon = True
            self._grace.start()

    def on_predict(self, args, state: TrainerState, control, **kwargs) -> None:
        self._end_after_training()

    def _end_after_training(self) -> None:
        """Outside a `with` block, end the run whose training ended (what the Trainer does next is after training)."""
        if self._status is not None and not self._in_block:
            self.finish(self._status)

    def _watch_final_save(self, model) -> None:
        """Trainer calls no callback when `trainer.save_model` writes the final adapter after training: wrap the
        trained model's `save_pretrained` (on this instance, until the run ends) to learn what the save wrote."""
        save = getattr(model, "save_pretrained", None)
        if save is None or not callable(save):
            return

        def save_and_record(save_directory, *args, **kwargs):
            if self._grace is not None:
                self._grace.cancel()  # the run waits for this save
            before = _listing(Path(save_directory))
            saved = save(save_directory, *args, **kwargs)
            try:
                after = _listing(Path(save_directory))
                self._saved = [_digest(f, str(f)) for f in sorted(after) if before.get(f) != after[f]]
            except OSError as err:
                log.warning("trainwire: the model saved in %s not recorded: %s", save_directory, err)
            self._end_after_training()
            return saved

        model.save_pretrained = save_and_record
        self._watched = model

    def log_artifacts(self, path: str | Path) -> list[dict]:
        """Record `path` (a file, or a directory's top-level files) as the run's output artifacts, replacing the
        default (the files of the model's save after training, else the last checkpoint's adapter files). Call it
        inside the `with` block so that the run has not ended yet. Returns the digests; a process other than rank 0
        records none."""
        if not self._main:
            return []
        path = Path(path)
        try:
            files = [path] if path.is_file() else sorted(f for f in path.iterdir() if f.is_file())
            digests = [_digest(f, str(f)) for f in files]
        except OSError as err:
            log.warning("trainwire: artifacts of %s not recorded: %s", path, err)
            return []
        if self._ended:
            log.warning("trainwire: run %s already ended; artifacts of %s not recorded (log them inside "
                        "`with TrainwireCallback(...)`)", self.run.run_id, path)
        self._artifacts.extend(digests)
        return digests

    def _output_artifacts(self) -> list[dict]:
        if self._artifacts or self._saved or self._last_checkpoint is None:
            return self._artifacts or self._saved
        path, files = self._last_checkpoint
        return [{**f, "name": str(path / f["name"])} for f in files if f["name"] in ADAPTER_FILES]

    def finish(self, status: str = "completed", error: str | None = None) -> bool:
        """End the run (once): wait for checkpoint hashing, mark the checkpoints gone from disk, emit run ended with
        the output artifacts, flush."""
        self._stop_gpu_only()
        with self._ending:  # the grace timer's thread may be ending it too
            if self.run is None or self._ended:
                return True
            self._ended, self._status = True, None
            self._stop_counting_tokens()
            self._stop_waiting_for_the_final_save()
            if self._hasher is not None:
                self._hasher.shutdown(wait=True)
                self._mark_deleted_checkpoints()
            state = self._state  # the Trainer's own, updated in place: right even when training raised
            return self.run.finish(status, error, self._output_artifacts(), epochs=state.epoch,
                                   completed_steps=state.global_step)

    def _stop_counting_tokens(self) -> None:
        if self._tokens is not None:
            self._tokens.remove()

    def _stop_waiting_for_the_final_save(self) -> None:
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        atexit.unregister(self._end_after_training)
        if self._watched is not None:
            vars(self._watched).pop("save_pretrained", None)
            self._watched = None

    def __enter__(self) -> TrainwireCallback:
        self._in_block = True
        return self

    def __exit__(self, exc_type, exc, _tb) -> None:
        self._in_block = False
        if exc is None:
            self.finish(self._status or "stopped")
        elif isinstance(exc, KeyboardInterrupt):
            self.finish("stopped", error="KeyboardInterrupt")
        else:
            self.finish("failed", error=f"{exc_type.__name__}: {exc}")
