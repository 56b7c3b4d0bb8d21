from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import NamedTuple

TopicPartition = tuple[str, int]


class TransportError(RuntimeError):
    """The transport failed in a way worth retrying (broker unreachable, database locked too long)."""


class FatalTransportError(TransportError):
    """The transport cannot go on in this process (e.g. fenced out of its consumer group by a member with the same
    instance id): retrying cannot help; the process should stop with this message."""


class DeliveryRefusedError(TransportError):
    """The transport answered, and refused messages (not allowed to write the topic, a message too large): they
    are not delivered and will not be unless appended again, once the cause is fixed."""


class TransportUnavailableError(TransportError):
    """The transport cannot be reached or refuses us at start (unreachable, wrong credentials or certificates, not
    allowed): the process should stop with this message, which names the setting to check."""


class Record(NamedTuple):  # not a frozen dataclass: built once per message, a third of the cost
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    ts_ms: int


class LogProducer(ABC):
    @abstractmethod
    def append(self, topic: str, key: bytes, value: bytes) -> None:
        """Queue one message; messages with the same key keep their order."""

    @abstractmethod
    def flush(self, timeout: float) -> int:
        """Deliver what is queued; return how many messages are still undelivered (in flight: they may yet be).
        Raises DeliveryRefusedError when the transport refused any message since the last flush (the SDK's
        spooling producer keeps such messages aside in its spool instead: it never raises into training)."""

    def close(self) -> None:
        self.flush(10.0)


class LogConsumer(ABC):
    # Called (inside poll) with the partitions this member is about to lose in a rebalance, while their offsets
    # can still be committed: the owner flushes what it holds for them.
    on_revoke: Callable[[list[TopicPartition]], None] | None = None

    @abstractmethod
    def poll(self, max_records: int, timeout: float) -> list[Record]:
        """Next records after the consumer's position, in order per partition."""

    @abstractmethod
    def commit(self, positions: Mapping[TopicPartition, int]) -> None:
        """Durably record, per partition, the offset of the next record to read."""

    @abstractmethod
    def rewind(self) -> None:
        """Go back to the committed positions: what was polled but not committed will be polled again."""

    def pause(self) -> None:
        """Back-pressure: hand out no more records until `resume`, while `poll` keeps the membership alive (a record
        already on its way may still come, and is to be processed as usual)."""
        self._paused = True

    def resume(self) -> None:
        self._paused = False

    _paused = False

    @property
    def paused(self) -> bool:
        return self._paused

    def assigned(self) -> bool:
        """Whether this member has been given its share of the partitions (possibly none, in a group with more
        members than partitions). Not yet after subscribing to Kafka, nor while out of the group after a lost
        session: what it reads as caught up then is only not started."""
        return True

    @abstractmethod
    def pending(self, fresh: bool = True) -> dict[TopicPartition, int | None] | None:
        """Per assigned partition, the records not yet polled (None: not known yet); None while not `assigned()`
        or when the transport cannot tell. `fresh=False` may answer from what the transport last heard (no round
        trip: a metric read in the hot loop must not stall it)."""

    def lag(self, fresh: bool = True) -> int | None:
        """Records not yet polled on the assigned partitions; None if unknown."""
        pending = self.pending(fresh)
        if pending is None or None in pending.values():
            return None
        return sum(pending.values())

    def behind(self) -> set[TopicPartition]:
        """The assigned partitions that may hold records not yet polled (those not heard from yet included), as
        last heard: no round trip."""
        pending = self.pending(fresh=False)
        return set() if pending is None else {partition for partition, count in pending.items() if count != 0}

    def close(self) -> None:
        pass


class LogTail(ABC):
    """Reads one topic from a point in time on, with no consumer group: nothing committed, nothing shared.

    For a process that wants what is published after it started (a run listening for its stop command)."""

    @abstractmethod
    def poll(self, max_records: int, timeout: float) -> list[Record]:
        """Next records whose log timestamp is at or after the starting time, in order per partition."""

    def close(self) -> None:
        pass


def next_positions(records: list[Record]) -> dict[TopicPartition, int]:
    positions: dict[TopicPartition, int] = {}
    for record in records:
        positions[(record.topic, record.partition)] = record.offset + 1
    return positions
