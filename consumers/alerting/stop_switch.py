"""The stop switch: a sink that turns a block-severity alert on an opted-in run into a stop command.

A run opts in when it starts (`trainwire.init(..., stop_on_block=True)`, `TrainwireCallback(stop_on_block=True)`),
which records the run started tag `trainwire.stop_on_block=true` and makes the run listen on the control topic.
The sink reads that tag from the store, so a run that did not opt in gets no command (and would not listen for
one). See docs/stop-switch.md.
"""

from __future__ import annotations

import logging
import uuid
from collections import OrderedDict
from collections.abc import Callable

from trainwire.infra.codecs import codec_for
from trainwire.infra.config import Settings
from trainwire.infra.log import LogProducer, TransportError, ensure_topics, open_producer
from trainwire.infra.log.topics import CONTROL
from trainwire.infra.store import connect_store
from trainwire.infra.store.read import StoreReader
from trainwire.schemas import STOP_ON_BLOCK_TAG, Alert, StopCommand

from .sinks import SinkError

log = logging.getLogger(__name__)
_COMMAND_IDS = uuid.UUID("3b0f7f3e-5a7c-4f5e-9d51-2c7b8e0a4d61")


OptedIn = Callable[[str], bool | None]  # run id → opted in? None: the run is not stored


class StoredOptIns:
    """Whether a run opted in, from its stored run started tags. Answers are cached (a run's tags never change);
    a run not stored yet is asked again next time."""

    def __init__(self, settings: Settings, max_cached: int = 100_000):
        self._settings = settings
        self._reader: StoreReader | None = None
        self._client = None
        self._cache: OrderedDict[str, bool] = OrderedDict()
        self._max_cached = max_cached

    def __call__(self, run_id: str) -> bool | None:
        if run_id in self._cache:
            self._cache.move_to_end(run_id)
            return self._cache[run_id]
        if self._reader is None:
            self._client = connect_store(self._settings.store_dsn)
            self._reader = StoreReader(self._client)
        started = self._reader.run_started(run_id)
        if started is None:
            return None
        opted_in = (started.get("tags") or {}).get(STOP_ON_BLOCK_TAG) == "true"
        self._cache[run_id] = opted_in
        if len(self._cache) > self._max_cached:
            self._cache.popitem(last=False)
        return opted_in

    def close(self) -> None:
        if self._client is not None:
            self._client.close()  # chdb serves one data directory per process: let go of it
            self._client = self._reader = None


def stop_command(alert: Alert) -> StopCommand:
    """The command for an alert; the same incident always gives the same command id."""
    return StopCommand(
        event_id=str(uuid.uuid5(_COMMAND_IDS, alert.dedup_key)), run_id=alert.run_id, experiment=alert.experiment,
        team=alert.team, rule=alert.rule, step=alert.step, dedup_key=alert.dedup_key,
        reason=f"{alert.rule}: {alert.message}" if alert.message else alert.rule,
    )


class StopSwitchSink:
    """Publishes a stop command, keyed by run id, for each firing alert of a stop severity
    (`stop_switch_severities`, default block) on a run that opted in."""

    name = "stop-switch"
    pages_people = False  # an action the run opted in to, not a page: silences, grouping and limits do not apply

    def __init__(self, settings: Settings, *, opted_in: OptedIn | None = None, producer: LogProducer | None = None):
        self._settings = settings
        self._severities = frozenset(settings.stop_switch_severities)
        self._owned = StoredOptIns(settings) if opted_in is None else None
        self._opted_in = opted_in or self._owned
        self._producer = producer
        self._codec = codec_for(settings)
        self._topic = settings.topic(CONTROL)

    def accepts(self, alert: Alert) -> bool:
        if alert.state != "firing" or alert.severity not in self._severities:
            return False
        try:
            return bool(self._opted_in(alert.run_id))
        except Exception as err:  # cannot tell now: route it, and let deliver() fail in a retryable way
            log.warning("stop switch: cannot tell whether run %s opted in (%s)", alert.run_id, err)
            return True

    def deliver(self, alert: Alert) -> None:
        """Publish the stop command and wait until the transport has it. Sending it again (a retry) is harmless:
        the run acts on the first command and the command id is the same."""
        try:
            opted_in = self._opted_in(alert.run_id)
        except Exception as err:
            raise SinkError(f"stop switch: cannot tell whether run {alert.run_id} opted in: {err}") from err
        if not opted_in:
            log.info("stop switch: run %s did not opt in; %s alert not acted on", alert.run_id, alert.rule)
            return
        command = stop_command(alert)
        try:
            producer = self._open()
            producer.append(self._topic, alert.run_id.encode(), self._codec.encode(command))
            undelivered = producer.flush(self._settings.flush_timeout_seconds)
        except TransportError as err:  # refused by the broker too (not allowed, too large): retried, never "told"
            raise SinkError(f"stop switch: stop command for run {alert.run_id} not published: {err}") from err
        if undelivered:
            raise SinkError(f"stop switch: stop command for run {alert.run_id} not delivered within "
                            f"{self._settings.flush_timeout_seconds:.0f}s")
        log.warning("stop switch: told run %s to stop: %s", alert.run_id, command.reason)

    def _open(self) -> LogProducer:
        if self._producer is None:
            ensure_topics(self._settings, [self._topic])
            self._producer = open_producer(self._settings)
        return self._producer

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close()
            self._producer = None
        if self._owned is not None:
            self._owned.close()
