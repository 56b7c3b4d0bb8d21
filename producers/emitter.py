"""Hands events from the training thread to a background sender: the training thread only enqueues.

Validation (pydantic) and Avro encoding happen on the sender thread, so `Run.log_step` costs one tuple and
one `put_nowait`. The queue is bounded; what does not fit is counted as dropped (never blocking training).

While events keep coming the sender looks for them every 50 ms rather than blocking on the queue, so that a put
wakes no thread (waking one costs the putting thread 5–40 µs on a VM). The sender never holds the GIL long against
the training thread: it works through a backlog in slices of about a millisecond and sleeps briefly between them
(a thread that runs Python without pause keeps the training thread waiting for the switch interval, 5 ms).

The sender never dies: an event that cannot be validated, encoded or handed to the transport is dropped, counted
(per run and per process) and logged once per kind of error; every later event still goes out. Each run's tally
(tally.py) keeps, on this thread, what the run lost and the summary of its valid events: its heartbeats and run
ended carry them, so the store shows what the run lost (docs/sdk.md).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ValidationError

from trainwire.infra.log import LogProducer
from trainwire.infra.log.topics import topic_for
from trainwire.schemas import Codec, CodecUnavailableError, Heartbeat, RunEnded, SingleObjectCodec

from .tally import RunTally

log = logging.getLogger(__name__)

_BATCH = 1_000  # events handed to the transport per flush
LINGER_SECONDS = 0.05  # how long events gather: each wake and transport write costs ~0.3 ms of CPU on a VM
POLL_SECONDS = 1.0  # after an event, the sender looks for the next every LINGER_SECONDS this long, then blocks
SLICE_SECONDS = 0.001  # the most the sender works without letting go of the GIL, while events wait
YIELD_SECONDS = 0.0002  # how long it then lets go: a real sleep, so that a waiting thread does take the GIL
MAX_REPORTED = 1_000  # kinds of error logged once each; past that they are only counted
BACKLOG_CACHE_SECONDS = 1.0
_REPORTS_BACKLOG = (Heartbeat, RunEnded)  # the events that carry the spool's backlog (v2)


Pending = tuple[type[BaseModel], dict, RunTally | None]
Backlog = Callable[[], tuple[int | None, int | None]]  # (events spooled, spool bytes); None where there is no spool


class Emitter:
    def __init__(self, producer: LogProducer, topic: Callable[[str], str], queue_size: int,
                 codec: Codec | None = None, backlog: Backlog | None = None):
        self._producer = producer
        self._codec = codec or SingleObjectCodec()
        self._topic = topic
        self._backlog = backlog
        self._backlog_read: tuple[float, tuple[int | None, int | None]] = (-BACKLOG_CACHE_SECONDS, (None, None))
        # Every event put is a task until the sender has handed it over (or refused it): flush waits for none left.
        self._queue: queue.Queue[Pending] = queue.Queue(maxsize=queue_size)
        self._closed = False
        self._flushing = threading.Event()  # set while someone waits in flush(): no lingering then
        self._wake = threading.Event()  # ends the sender's linger: flush waits for it
        self._reported: set[tuple] = set()
        self.accepted = 0
        self.sent = 0
        self.dropped = 0
        self.invalid = 0
        self.send_errors = 0
        self._thread = threading.Thread(target=self._run, name="trainwire-sender", daemon=True)
        self._thread.start()

    def submit(self, event_type: type[BaseModel], fields: dict, tally: RunTally | None = None,
               wait: float = 0.0) -> bool:
        """Never blocks (unless `wait` > 0: up to that long for room). False when the event could not be queued."""
        if self._closed:
            return False
        try:
            if wait > 0:
                self._queue.put((event_type, fields, tally), timeout=wait)
            else:
                self._queue.put_nowait((event_type, fields, tally))
        except queue.Full:
            self._dropped(tally)
            if self.dropped == 1 or self.dropped % 10_000 == 0:
                log.warning("trainwire queue full: %d events dropped so far", self.dropped)
            return False
        self.accepted += 1
        return True

    def _dropped(self, tally: RunTally | None) -> None:
        self.dropped += 1
        if tally is not None:
            tally.dropped += 1

    def _run(self) -> None:
        last_event = time.monotonic()
        while True:
            try:
                first = self._queue.get_nowait()
            except queue.Empty:
                if self._closed:
                    return
                if time.monotonic() - last_event < POLL_SECONDS:
                    # Events are coming: look again in a moment instead of blocking on the queue, so that the next
                    # put wakes no thread (waking one costs the training thread microseconds in the put).
                    self._linger()
                    continue
                try:
                    first = self._queue.get(timeout=0.1)  # quiet: block until the next event
                except queue.Empty:
                    continue
                if not self._flushing.is_set():
                    self._linger()  # let events gather: one transport write and GIL hand-over per batch
            last_event = time.monotonic()
            try:
                self._send_batch(first)
            except Exception:  # never reached in practice (each event is guarded): the sender must outlive anything
                self.send_errors += 1
                log.exception("trainwire sender: unexpected error; going on")

    def _linger(self) -> None:
        self._wake.wait(LINGER_SECONDS)
        self._wake.clear()

    def _send_batch(self, first: Pending) -> None:
        """Send `first` and up to a batch of the events queued meanwhile, then flush the transport. Each event is a
        finished task once handed over (or refused), so `flush` waits for what the sender holds too."""
        pending = first
        slice_started = time.perf_counter()
        for count in range(_BATCH):
            if count:
                try:
                    pending = self._queue.get_nowait()
                except queue.Empty:
                    break
            try:
                self._send_one(*pending)
            except Exception as err:
                self._refused(pending[0], pending[2], err, invalid=False)
            finally:
                self._queue.task_done()
            if time.perf_counter() - slice_started >= SLICE_SECONDS and not self._flushing.is_set():
                time.sleep(YIELD_SECONDS)  # not while flush waits: the thread that called it is waiting for us
                slice_started = time.perf_counter()
        try:
            self._producer.flush(0)
        except Exception as err:  # the transport will retry on the next flush; never kill the sender
            self.send_errors += 1
            self._report(("flush", type(err).__name__), "trainwire transport flush failed (retried on the next "
                         "flush): %r", err)

    def _send_one(self, event_type: type[BaseModel], fields: dict, tally: RunTally | None) -> None:
        if tally is not None:
            tally.complete(event_type, fields)
        if event_type in _REPORTS_BACKLOG:
            fields["events_spooled"], fields["spool_bytes"] = self._spool_backlog()
        encoded = self._encode(event_type, fields, tally)
        if encoded is None:
            return
        event, topic, key, value = encoded
        try:
            self._producer.append(topic, key, value)
        except Exception as err:
            self._refused(event_type, tally, err, invalid=False)
            return
        self.sent += 1
        if tally is not None:
            tally.sent(event)

    def _encode(self, event_type: type[BaseModel], fields: dict,
                tally: RunTally | None) -> tuple[BaseModel, str, bytes, bytes] | None:
        backoff = 0.1
        while True:
            try:
                event = event_type(**fields)
                return event, self._topic(topic_for(event.kind)), event.run_id.encode(), self._codec.encode(event)
            except CodecUnavailableError as err:  # e.g. the schema registry is down: wait, the event is fine
                if self._closed:
                    self._refused(event_type, tally, err, invalid=False)
                    return None
                log.warning("trainwire cannot encode yet (%s); retrying in %.1fs", err, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception as err:  # ValidationError, SchemaError, or what Avro cannot hold (UnicodeEncodeError, …)
                self._refused(event_type, tally, err, invalid=True)
                return None

    def _refused(self, event_type: type[BaseModel], tally: RunTally | None, err: Exception,
                 invalid: bool) -> None:
        kind = getattr(event_type, "kind", None) or getattr(event_type, "__name__", None) or repr(event_type)
        if invalid:
            self.invalid += 1
            if tally is not None:
                tally.invalid += 1
            what = "an invalid"
        else:
            self.send_errors += 1
            self._dropped(tally)
            what = "an unsendable"
        reason = _error_kind(err)
        self._report((kind, reason), "trainwire dropped %s %s event (%s; further events refused for this reason "
                     "are counted, not logged): %s", what, kind, reason, err)

    def _report(self, key: tuple, message: str, *args: object) -> None:
        if key in self._reported or len(self._reported) >= MAX_REPORTED:
            return
        self._reported.add(key)
        log.error(message, *args)

    def _spool_backlog(self) -> tuple[int | None, int | None]:
        """What waits in the disk spool, read at most once a second (a heartbeat per run every few seconds)."""
        if self._backlog is None:
            return None, None
        read_at, value = self._backlog_read
        now = time.monotonic()
        if now - read_at >= BACKLOG_CACHE_SECONDS:
            try:
                value = self._backlog()
            except Exception as err:
                self._report(("backlog", type(err).__name__), "trainwire cannot read the spool's size: %r", err)
                value = (None, None)
            self._backlog_read = (now, value)
        return value

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued so far is handed to the transport and delivered; False on timeout."""
        deadline = time.monotonic() + timeout
        self._flushing.set()
        self._wake.set()
        try:
            done = self._queue.all_tasks_done  # an event taken off the queue is unfinished until it is handed over
            with done:
                while self._queue.unfinished_tasks:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    done.wait(min(remaining, 0.05))
            return self._producer.flush(max(0.0, deadline - time.monotonic())) == 0
        except Exception as err:
            self.send_errors += 1
            self._report(("flush", type(err).__name__), "trainwire transport flush failed: %r", err)
            return False
        finally:
            self._flushing.clear()

    def close(self, timeout: float) -> bool:
        delivered = self.flush(timeout)
        self._closed = True
        self._thread.join(timeout=1.0)
        try:
            self._producer.close()
        except Exception as err:
            log.error("trainwire: closing the transport failed: %r", err)
        if self.dropped or self.invalid:
            log.warning("trainwire: %d events dropped and %d refused as invalid in this process (of %d accepted)",
                        self.dropped, self.invalid, self.accepted)
        return delivered


def _error_kind(err: Exception) -> str:
    """What makes two errors the same kind, for logging once: the fields and pydantic error types, or the class."""
    if isinstance(err, ValidationError):
        return ", ".join(sorted({f"{e['loc'][0] if e['loc'] else '?'}: {e['type']}" for e in err.errors()}))
    return type(err).__name__


def spool_backlog(producer: LogProducer, spool_dir: Path) -> Backlog:
    """Events the spooling producer has not had acknowledged, and the bytes of the spool files on this host."""
    def read() -> tuple[int | None, int | None]:
        undelivered = getattr(producer, "undelivered", None)
        spooled = undelivered() if callable(undelivered) else None
        size = 0
        with os.scandir(spool_dir) as entries:
            for entry in entries:
                if entry.name.endswith((".db", ".db-wal")) and entry.is_file():
                    size += entry.stat().st_size
        return spooled, size

    return read
