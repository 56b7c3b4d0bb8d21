"""Builds the ingest pipeline from settings and runs it until told to stop."""

from __future__ import annotations

import gc
import logging
import threading
from contextlib import ExitStack

from trainwire.infra.codecs import codec_for
from trainwire.infra.config import Settings
from trainwire.infra.log import ensure_topics, open_consumer, open_producer
from trainwire.infra.log.topics import ALERTS, CONTROL, DEAD_LETTERS
from trainwire.infra.store import apply_retention, connect_store, migrate

from .detectors import DetectorEngine, StoreHistory
from .governance.worker import GateWorker
from .alert_printer import AlertPrinter
from .ingest import IngestPipeline, event_topics
from .writer import ClickHouseWriter

log = logging.getLogger(__name__)
INGEST_GROUP = "ingest"  # a consumer group name, scoped by the topic prefix like the topics


def build_ingest(settings: Settings, on_alert=None, group: str = INGEST_GROUP,
                 instance_id: str | None = None) -> IngestPipeline:
    """`instance_id`: the Kafka group.instance.id (static membership); default <host>-<group>-<slot>."""
    client = connect_store(settings.store_dsn)
    migrate(client, cluster=settings.store_cluster)
    apply_retention(client, settings.metrics_retention_days, settings.gpu_retention_days, settings.store_cluster)
    topics = event_topics(settings)
    ensure_topics(settings, [*topics, settings.topic(ALERTS), settings.topic(DEAD_LETTERS), settings.topic(CONTROL)])
    # Each part is opened in turn and, should a later one fail, closed again: a Kafka consumer or a gate thread
    # left open would hold the process for minutes after its error.
    with ExitStack() as opened:
        consumer = open_consumer(settings, settings.topic(group), topics, instance_id=instance_id)
        opened.callback(consumer.close)
        producer = open_producer(settings)
        opened.callback(producer.close)
        gates = GateWorker(settings).start()  # evaluates the quality gates of every run that ends
        opened.callback(gates.close)
        if on_alert is None:
            on_alert = AlertPrinter()
            opened.callback(on_alert.close)
        pipeline = IngestPipeline(
            consumer, ClickHouseWriter(client), producer, settings,
            detectors=DetectorEngine(settings.detectors, history=StoreHistory(client)),
            on_alert=on_alert, codec=codec_for(settings), on_run_ended=gates)
        opened.pop_all()
    return pipeline


def run_ingest(pipeline: IngestPipeline, stop: threading.Event) -> None:
    try:
        while not stop.is_set():
            pipeline.run_once()
        pipeline.run_once(poll_timeout=0, force_flush=True)
    finally:
        pipeline.close()


def tune_gc_for_ingest() -> None:
    """For a process that does little but ingest: the loop holds a batch of up to `batch_max_rows` decoded records
    (dicts, rows) alive, and CPython's default collector, run every 700 allocations, rescans them again and again
    (~20% of a 20,000-row batch's time). Decoded events hold no reference cycles, so collect young objects less
    often, and leave everything made at start-up (modules, schemas, models) out of collections for good."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 10)
