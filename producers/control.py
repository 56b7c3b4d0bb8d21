"""The trainer side of the stop switch: a run that opted in listens for its stop command (docs/stop-switch.md).

The listener tails the control topic from the moment the run started, on a daemon thread, and hands the first
command naming its run to the run. It never blocks or fails training: transport trouble is logged and retried.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable

from trainwire.infra.codecs import codec_for
from trainwire.infra.config import Settings
from trainwire.infra.log import LogTail, Record, open_tail
from trainwire.infra.log.topics import CONTROL
from trainwire.schemas import SchemaError, StopCommand, decode

log = logging.getLogger(__name__)
MAX_BACKOFF_SECONDS = 30.0


class TrainingStopped(Exception):
    """Raised by `Run.check_stop()` once the stop switch told the run to stop; the run then ends `stopped`."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class StopListener:
    """Calls `on_stop(command)` (once, from its own thread) when a stop command for `run_id` is published on the
    control topic at or after `since_ms`."""

    def __init__(self, settings: Settings, run_id: str, poll_seconds: float = 0.5):
        self._settings = settings
        self._run_id = run_id
        self._key = run_id.encode()
        self._codec = codec_for(settings)
        self._poll_seconds = poll_seconds
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, since_ms: int, on_stop: Callable[[StopCommand], None]) -> StopListener:
        self._thread = threading.Thread(target=self._listen, args=(since_ms, on_stop), daemon=True,
                                        name=f"trainwire-control-{self._run_id[:8]}")
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop listening; waits (bounded) for the thread, which lets go of its transport connection."""
        self._stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _listen(self, since_ms: int, on_stop: Callable[[StopCommand], None]) -> None:
        tail: LogTail | None = None
        backoff = 0.0
        try:
            while not self._stopping.is_set():
                try:
                    if tail is None:
                        # a group no one else uses: every run reads every command and keeps its own
                        tail = open_tail(self._settings, self._settings.topic(CONTROL), since_ms,
                                         group=f"{self._settings.topic('run-control')}-{uuid.uuid4().hex}")
                    for record in tail.poll(100, self._poll_seconds):
                        if (command := self._command(record)) is not None:
                            on_stop(command)
                            return
                    backoff = 0.0
                except Exception as err:  # listening must never take the training job down
                    backoff = min(MAX_BACKOFF_SECONDS, max(1.0, backoff * 2))
                    log.warning("trainwire: run %s cannot read stop commands (%s); retrying in %.0fs",
                                self._run_id, err, backoff)
                    if tail is not None:
                        _close_quietly(tail)
                        tail = None
                    self._stopping.wait(backoff)
        finally:
            if tail is not None:
                _close_quietly(tail)

    def _command(self, record: Record) -> StopCommand | None:
        if record.key is not None and record.key != self._key:
            return None  # another run's: not worth decoding
        try:
            command = decode(record.value, self._codec)
        except SchemaError as err:
            log.warning("trainwire: unreadable record on the control topic at offset %d: %s", record.offset, err)
            return None
        if not isinstance(command, StopCommand) or command.run_id != self._run_id:
            return None
        return command


def _close_quietly(tail: LogTail) -> None:
    try:
        tail.close()
    except Exception:
        log.debug("trainwire: closing the control topic tail failed", exc_info=True)
