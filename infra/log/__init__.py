"""The transport: one producer/consumer interface over Kafka and over the embedded SQLite log."""

from .base import LogConsumer, LogProducer, LogTail, Record, TransportError
from .factory import open_consumer, open_producer, open_tail, ensure_topics

__all__ = ["LogConsumer", "LogProducer", "LogTail", "Record", "TransportError", "ensure_topics", "open_consumer",
           "open_producer", "open_tail"]
