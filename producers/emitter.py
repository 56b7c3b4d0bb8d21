"""Hands events from the training thread to a background sender: the training thread only enqueues.

Validation (pydantic) and Avro encoding happen on the sender thread, so `Run.log_step` costs one tuple and
one `put_nowait`. The queue is bounded; what does not fit is counted as dropped (never blocking training).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from pydantic import BaseModel, ValidationError

from trainwire.infra.log import LogProducer
from trainwire.infra.log.topics import topic_for
from trainwire.schemas import Codec, CodecUnavailableError, SchemaError, SingleObjectCodec

log = logging.getLogger(__name__)

Pending = tuple[type[BaseModel], dict]
_BATCH = 1_000  # small enough that one batch never holds the GIL long against the training thread
LINGER_SECONDS = 0.02


class Emitter:
    def __init__(self, producer: LogProducer, topic: Callable[[str], str], queue_size: int,
                 codec: Codec | None = None):
        self._producer = producer
        self._codec = codec or SingleObjectCodec()
        self._topic = topic
        self._queue: queue.Queue[Pending] = queue.Queue(maxsize=queue_size)
        self._idle = threading.Condition()
        self._in_flight = 0
        self._closed = False
        self._flushing = threading.Event()  # set while someone waits in flush(): no lingering then
        self.accepted = 0
        self.sent = 0
        self.dropped = 0
        self.invalid = 0
        self.send_errors = 0
        self._thread = threading.Thread(target=self._run, name="trainwire-sender", daemon=True)
        self._thread.start()

    def submit(self, event_type: type[BaseModel], fields: dict) -> bool:
        """Never blocks. False when the event could not be queued."""
        if self._closed:
            return False
        try:
            self._queue.put_nowait((event_type, fields))
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 10_000 == 0:
                log.warning("trainwire queue full: %d events dropped so far", self.dropped)
            return False
        self.accepted += 1
        return True

    def _run(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                if self._closed:
                    return
                continue
            if not self._flushing.is_set():
                # Let events gather: one spool write and one GIL hand-over per batch, not per event.
                self._flushing.wait(LINGER_SECONDS)
            batch = [first]
            while len(batch) < _BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            with self._idle:
                self._in_flight = len(batch)
            self._send(batch)
            with self._idle:
                self._in_flight = 0
                self._idle.notify_all()

    def _send(self, batch: list[Pending]) -> None:
        for event_type, fields in batch:
            encoded = self._encode(event_type, fields)
            if encoded is not None:
                topic, key, value = encoded
                self._producer.append(topic, key, value)
                self.sent += 1
        try:
            self._producer.flush(0)
        except Exception:  # the transport will retry on the next flush; never kill the sender
            self.send_errors += 1
            log.exception("trainwire transport flush failed")

    def _encode(self, event_type: type[BaseModel], fields: dict) -> tuple[str, bytes, bytes] | None:
        backoff = 0.1
        while True:
            try:
                event = event_type(**fields)
                return self._topic(topic_for(event.kind)), event.run_id.encode(), self._codec.encode(event)
            except (ValidationError, SchemaError) as err:
                self.invalid += 1
                log.error("trainwire dropped an invalid %s event: %s", event_type.kind, err)
                return None
            except CodecUnavailableError as err:  # e.g. the schema registry is down: wait, the event is fine
                if self._closed:
                    self.send_errors += 1
                    return None
                log.warning("trainwire cannot encode yet (%s); retrying in %.1fs", err, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued so far is handed to the transport and delivered; False on timeout."""
        deadline = time.monotonic() + timeout
        self._flushing.set()
        try:
            with self._idle:
                while not self._queue.empty() or self._in_flight:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._idle.wait(min(remaining, 0.05))
            return self._producer.flush(max(0.0, deadline - time.monotonic())) == 0
        finally:
            self._flushing.clear()

    def close(self, timeout: float) -> bool:
        delivered = self.flush(timeout)
        self._closed = True
        self._thread.join(timeout=1.0)
        self._producer.close()
        return delivered
