"""The SDK: one `Run` per training run. Every `log_*` call is non-blocking and never raises on telemetry."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from itertools import count
from pathlib import Path
from typing import Any

from trainwire.schemas import (
    STOP_ON_BLOCK_TAG, Checkpoint, Eval, GpuSample, Heartbeat, RunEnded, RunStarted, Step, StopCommand,
)

from .control import StopListener, TrainingStopped
from .emitter import Emitter
from .environment import hostname, sha256_file
from .gpu import GpuSampler, GpuSource
from .tally import RunTally
from .values import (
    InvalidRunError, check_interval, check_rank, check_run_started, config_path, hyperparameters_json, number, representable,
    representable_files, valid_run_ended,
)

log = logging.getLogger(__name__)


class Run:
    def __init__(
        self,
        emitter: Emitter,
        *,
        experiment: str,
        run_name: str = "",
        team: str = "",
        run_id: str | None = None,
        host: str | None = None,
        heartbeat_seconds: float = 5.0,
        flush_timeout: float = 10.0,
        sample_gpus: bool = True,
        gpu_source: GpuSource | None = None,
        gpu_interval: float = 5.0,
        rank: int = 0,
        stop_listener: StopListener | None = None,
    ):
        heartbeat_seconds = check_interval("heartbeat_seconds", heartbeat_seconds)
        gpu_interval = check_interval("gpu_interval", gpu_interval)
        rank = check_rank(rank)
        self.run_id = run_id or str(uuid.uuid4())
        self.experiment = experiment
        self.run_name = run_name
        self._emitter = emitter
        self._envelope = {"run_id": self.run_id, "experiment": experiment, "team": team, "host": host or hostname()}
        # From the start time in µs, not from 0: a run resumed under the same id by a new process (an elastic
        # restart, a resume with a fixed run id) keeps numbering upwards, so its events never look like redeliveries
        # of the first process's (ingest keeps the highest stored seq per run). One process emits far fewer than
        # a million events a second, so it never catches up with the clock.
        self._seq = count(time.time_ns() // 1_000)
        self._flush_timeout = flush_timeout
        # What the run lost and the summary of its valid events, kept by the sender thread (tally.py).
        self._tally = RunTally()
        self._started = time.monotonic()
        self._finished = False
        self._stop_heartbeat = threading.Event()
        self._heartbeat = threading.Thread(
            target=self._beat, args=(heartbeat_seconds,), name=f"trainwire-heartbeat-{self.run_id[:8]}", daemon=True
        )
        self._gpu = GpuSampler(self.log_gpu, gpu_interval, rank, gpu_source) if sample_gpus else None
        self._stop_listener = stop_listener
        self._stop_requested = threading.Event()
        self._stop_reason: str | None = None
        self.events_emitted = 0

    def _emit(self, event_type: type, fields: dict[str, Any], wait: float = 0.0) -> None:
        fields.update(self._envelope)
        fields["seq"] = next(self._seq)
        fields["ts_ms"] = time.time_ns() // 1_000_000
        if self._emitter.submit(event_type, fields, self._tally, wait):
            self.events_emitted += 1

    @property
    def events_dropped(self) -> int:
        """Events of this run lost so far: the queue was full, or the transport refused them."""
        return self._tally.dropped

    @property
    def events_invalid(self) -> int:
        """Events of this run refused so far by validation or Avro encoding (logged once per kind of error)."""
        return self._tally.invalid

    def start(self, config: dict | str | Path | None = None, **fields: Any) -> Run:
        """Emit run started: hyperparameters (a dict) or a config file (hashed), plus any RunStarted field.

        Checked here, on the caller's thread: `InvalidRunError` names what cannot be recorded (an unknown keyword,
        a blank experiment, a value out of range), before anything is sent or started."""
        if (path := config_path(config)) is not None:
            fields.setdefault("config_file", representable(path.name))
            try:
                fields.setdefault("config_sha256", sha256_file(path))
            except OSError as err:
                raise InvalidRunError(f"trainwire.init: config: cannot read {path}: {err}", ("config",)) from None
        elif config:
            fields["hyperparameters_json"] = hyperparameters_json(config)
        fields.setdefault("run_name", self.run_name)
        if self._stop_listener is not None:
            fields["tags"] = {**(fields.get("tags") or {}), STOP_ON_BLOCK_TAG: "true"}
        check_run_started({**fields, **self._envelope, "seq": 0})
        if self._stop_listener is not None:
            self._stop_listener.start(time.time_ns() // 1_000_000, self._stop_commanded)
        self._emit(RunStarted, fields)
        self._heartbeat.start()
        if self._gpu is not None:
            self._gpu.start()
        return self

    def log_step(
        self,
        step: int,
        loss: float | None = None,
        learning_rate: float | None = None,
        grad_norm: float | None = None,
        tokens_per_s: float | None = None,
        *,
        epoch: float | None = None,
        samples_per_s: float | None = None,
        batch_time_s: float | None = None,
        tokens: int | None = None,
        **extra: float,
    ) -> None:
        fields = {
            "step": step, "loss": loss, "learning_rate": learning_rate, "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s, "epoch": epoch, "samples_per_s": samples_per_s,
            "batch_time_s": batch_time_s, "tokens": tokens,
        }
        if extra:  # an empty dict left out too: fields of plain values are a dict the garbage collector skips
            fields["extra"] = extra
        self._emit(Step, fields)

    def log_eval(
        self,
        step: int,
        eval_loss: float | None = None,
        eval_accuracy: float | None = None,
        *,
        epoch: float | None = None,
        runtime_s: float | None = None,
        **metrics: float,
    ) -> None:
        loss = None if eval_loss is None else number(eval_loss)
        fields = {
            "step": step, "eval_loss": eval_loss, "eval_accuracy": eval_accuracy,
            "perplexity": Eval.perplexity_of(loss), "epoch": epoch, "runtime_s": runtime_s,
        }
        if metrics:
            fields["metrics"] = metrics
        self._emit(Eval, fields)

    def log_checkpoint(self, step: int, path: str | Path, files: list[dict] | None = None,
                       eval_loss: float | None = None) -> None:
        """`path` and file names that are not UTF-8 (a non-UTF-8 file system) are recorded with `\\xNN` escapes."""
        try:
            path = representable(path)
            files = representable_files(files)
        except TypeError:  # not a path: validation refuses the event on the sender thread
            pass
        # is_best: whether eval_loss is at most the best eval so far (the sender fills it in, in logging order)
        self._emit(Checkpoint, {"step": step, "path": path, "files": files or [], "eval_loss": eval_loss})

    def log_checkpoint_deleted(self, step: int, path: str | Path) -> None:
        """Mark the checkpoint logged at `step` and `path` as gone from disk (e.g. rotated away by the trainer)."""
        try:
            path = representable(path)
        except TypeError:
            pass
        self._emit(Checkpoint, {"step": step, "path": path, "files": [], "deleted": True})

    def log_gpu(self, **sample: Any) -> None:
        self._emit(GpuSample, sample)

    @property
    def should_stop(self) -> bool:
        """True once the stop switch (or `request_stop`) asked this run to stop: end the training loop."""
        return self._stop_requested.is_set()

    @property
    def stop_reason(self) -> str | None:
        return self._stop_reason

    def check_stop(self) -> None:
        """Raise `TrainingStopped(reason)` if the run was asked to stop; `with trainwire.init(...)` ends it stopped."""
        if self._stop_requested.is_set():
            raise TrainingStopped(self._stop_reason or "stop requested")

    def request_stop(self, reason: str) -> None:
        """Ask the run to stop; the first reason is kept and becomes the run's error when it ends."""
        if not self._stop_requested.is_set():
            self._stop_reason = reason
            self._stop_requested.set()

    def _stop_commanded(self, command: StopCommand) -> None:
        log.warning("trainwire: run %s told to stop by the stop switch: %s", self.run_id, command.reason)
        self.request_stop(command.reason)

    def _beat(self, interval: float) -> None:
        while not self._stop_heartbeat.wait(interval):
            try:
                self._emit(Heartbeat, {})  # the sender adds the last step sent and the run's counters
            except Exception:  # never reached: a heartbeat thread that died would make a live run look stalled
                log.exception("trainwire: heartbeat failed; trying again next interval")

    def finish(self, status: str = "completed", error: str | None = None, artifacts: list[dict] | None = None, *,
               epochs: float | None = None, completed_steps: int | None = None) -> bool:
        """Emit run ended and wait (bounded) until the run's events are delivered. Idempotent.

        `completed_steps` defaults to the last step sent; a trainer knows better (steps after the last log). The loss
        summary, best eval and best checkpoint come from the events that were valid (the sender's tally).
        A run asked to stop that did not fail ends `stopped`, with the stop reason as its error. A summary value the
        event cannot hold (a bad `completed_steps`, an artifact of impossible size) is left out, with a warning:
        the run still ends. An unknown `status` raises `InvalidRunError` (the run is not ended then)."""
        if self._finished:
            return True
        if self._stop_requested.is_set() and status != "failed":
            status, error = "stopped", error or self._stop_reason
        fields, replaced = valid_run_ended({
            **self._envelope, "seq": 0, "status": status, "error": error,
            "duration_s": time.monotonic() - self._started, "completed_steps": completed_steps, "epochs": epochs,
            "artifacts": artifacts or [],
        })
        if replaced:
            log.warning("trainwire: run %s: %s left out of its run ended (values it cannot hold)", self.run_id,
                        ", ".join(replaced))
        self._finished = True
        self._stop_heartbeat.set()
        if self._gpu is not None:
            self._gpu.stop()
        if self._stop_listener is not None:
            self._stop_listener.stop()
        # Waits (bounded) for room rather than dropping: without its run ended a run never ends in the store.
        self._emit(RunEnded, fields, wait=self._flush_timeout)
        delivered = self._emitter.flush(self._flush_timeout)
        if not delivered:
            log.warning("trainwire: run %s ended with events still undelivered after %.0fs",
                        self.run_id, self._flush_timeout)
        return delivered

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type, exc, _tb) -> None:
        if exc is None:
            self.finish("completed")
        elif isinstance(exc, TrainingStopped):
            self.finish("stopped", error=exc.reason)
        elif isinstance(exc, KeyboardInterrupt):
            self.finish("stopped", error="KeyboardInterrupt")
        else:
            self.finish("failed", error=f"{exc_type.__name__}: {exc}")
