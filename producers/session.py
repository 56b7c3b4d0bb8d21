"""One sender per process and settings, shared by every run the process starts; closed (bounded) at exit."""

from __future__ import annotations

import atexit
import threading
import uuid
from pathlib import Path
from typing import Any

from trainwire.infra.codecs import codec_for
from trainwire.infra.config import Settings, load_settings
from trainwire.infra.log import open_producer

from .control import StopListener
from .emitter import Emitter, spool_backlog
from .gpu import GpuSource
from .run import Run
from .values import check_run_started

_lock = threading.Lock()
_emitters: dict[Settings, Emitter] = {}


def emitter_for(settings: Settings) -> Emitter:
    with _lock:
        if settings not in _emitters:
            producer = open_producer(settings, spooled=True)
            backlog = spool_backlog(producer, settings.spool_dir) if settings.kafka else None
            _emitters[settings] = Emitter(producer, settings.topic, settings.queue_size, codec_for(settings),
                                          backlog)
            if len(_emitters) == 1:
                atexit.register(close_all)
        return _emitters[settings]


def close_all() -> None:
    with _lock:
        emitters = list(_emitters.items())
        _emitters.clear()
    for settings, emitter in emitters:
        emitter.close(settings.flush_timeout_seconds)


def init(
    experiment: str,
    run_name: str = "",
    config: dict | str | Path | None = None,
    *,
    settings: Settings | None = None,
    run_id: str | None = None,
    team: str | None = None,
    sample_gpus: bool = True,
    gpu_source: GpuSource | None = None,
    rank: int = 0,
    stop_on_block: bool = False,
    **run_started: Any,
) -> Run:
    """Start a run: emits run started and returns the `Run` to log with (also a context manager).

    What it is given is checked here, before training starts: `InvalidRunError` (a ValueError) names an unknown
    keyword (`lerning_rate=`: hyperparameters go in `config`), a blank experiment or run id, a value out of its
    field's range or a string Avro cannot hold. After that, `log_*` never raises: a bad value drops its own event
    (counted in `run.events_invalid` and in the run's run ended) and every other event still goes out.

    `stop_on_block`: opt in to the stop switch: a block-severity alert on this run (e.g. a NaN loss) makes
    `run.should_stop` true and `run.check_stop()` raise `TrainingStopped` (docs/stop-switch.md)."""
    settings = settings or load_settings()
    run_id = run_id or str(uuid.uuid4())
    check_run_started({**run_started, "run_id": run_id, "experiment": experiment, "run_name": run_name,
                       "team": settings.team if team is None else team, "seq": 0})
    run = Run(
        emitter_for(settings),
        experiment=experiment,
        run_name=run_name,
        team=settings.team if team is None else team,
        run_id=run_id,
        heartbeat_seconds=settings.heartbeat_seconds,
        flush_timeout=settings.flush_timeout_seconds,
        sample_gpus=sample_gpus,
        gpu_source=gpu_source,
        gpu_interval=settings.gpu_sample_seconds,
        rank=rank,
        stop_listener=StopListener(settings, run_id) if stop_on_block else None,
    )
    return run.start(config, **run_started)
