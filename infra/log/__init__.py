"""The transport: one producer/consumer interface over Kafka and over the embedded SQLite log."""

from .base import LogConsumer, LogProducer, LogTail, Record, TransportError, TransportUnavailableError
from .factory import check_transport, ensure_topics, open_consumer, open_producer, open_tail

__all__ = ["LogConsumer", "LogProducer", "LogTail", "Record", "TransportError", "TransportUnavailableError",
           "check_transport", "ensure_topics", "open_consumer", "open_producer", "open_tail"]
