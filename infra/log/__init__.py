"""The transport: one producer/consumer interface over Kafka and over the embedded SQLite log."""

from .base import LogConsumer, LogProducer, Record, TransportError
from .factory import open_consumer, open_producer, ensure_topics

__all__ = ["LogConsumer", "LogProducer", "Record", "TransportError", "ensure_topics", "open_consumer", "open_producer"]
