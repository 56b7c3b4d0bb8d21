"""The ingest steps: a batch is stored in a worker thread while the next is read; a full batch waiting for the
insert before it pauses the partitions (the loop goes on, it does not sleep on the insert); offsets are committed
in order, each only once its batch is stored."""

import sqlite3
import threading
import time

from trainwire.consumers.ingest import IngestPipeline
from trainwire.consumers.writer import ClickHouseWriter
from trainwire.infra.log.sqlite import SqliteLogConsumer, SqliteLogProducer
from trainwire.infra.log.topics import EVENTS
from trainwire.infra.store import connect_store, migrate
from trainwire.schemas import Step, encode


class GatedWriter(ClickHouseWriter):
    """A store whose inserts wait until the test opens the gate, as a slow ClickHouse would."""

    def __init__(self, client):
        super().__init__(client)
        self.gate = threading.Event()
        self.inserting = threading.Event()

    def write(self, rows_by_kind, sources_by_kind=None):
        self.inserting.set()
        assert self.gate.wait(30)
        return super().write(rows_by_kind, sources_by_kind)


def committed(settings) -> int:
    """Records of the log before ingest's committed position."""
    with sqlite3.connect(settings.local_log_path) as conn:
        row = conn.execute("SELECT next_offset FROM commits WHERE grp = 'ingest'").fetchone()
        return conn.execute("SELECT count(*) FROM records WHERE offset < ?", (row[0] if row else 0,)).fetchone()[0]


def test_a_slow_insert_pauses_reading_and_commits_follow_their_inserts(local_settings):
    settings = local_settings.model_copy(update={"batch_max_rows": 5, "batch_max_seconds": 60.0})
    producer = SqliteLogProducer(settings.local_log_path)
    for seq in range(20):
        producer.append(settings.topic(EVENTS), b"r", encode(Step(run_id="r", experiment="e", seq=seq, step=seq,
                                                                 loss=1.0)))
    producer.close()
    client = connect_store(settings.store_dsn)
    migrate(client)
    writer = GatedWriter(client)
    consumer = SqliteLogConsumer(settings.local_log_path, "ingest", [settings.topic(EVENTS)])
    pipeline = IngestPipeline(consumer, writer, None, settings, on_alert=lambda alert: None)

    assert pipeline.run_once(poll_timeout=0) == 5  # a full batch: handed to the insert, which waits
    assert writer.inserting.wait(10)
    assert pipeline.run_once(poll_timeout=0) == 5  # the next batch is read meanwhile
    started = time.monotonic()
    assert pipeline.run_once(poll_timeout=0.2) == 0  # both full: reading pauses, the loop does not block
    assert time.monotonic() - started < 2.0
    assert consumer.paused and pipeline.held() == 10
    assert committed(settings) == 0  # nothing committed before its insert

    writer.gate.set()
    assert pipeline.drain(idle_seconds=0.5, deadline=time.monotonic() + 60)
    assert not consumer.paused
    assert committed(settings) == 20 and pipeline.stats.stored == 20
    assert client.query("SELECT count() FROM steps").result_rows[0][0] == 20
    pipeline.close()


def test_a_failed_start_closes_what_it_opened(local_settings, monkeypatch):
    from trainwire.consumers import service

    def refuse(*args, **kwargs):
        raise RuntimeError("the pipeline could not be built")

    monkeypatch.setattr(service, "IngestPipeline", refuse)
    before = {t.name for t in threading.enumerate()}
    try:
        service.build_ingest(local_settings)
    except RuntimeError as err:
        assert "could not be built" in str(err)
    else:
        raise AssertionError("build_ingest went on")
    assert not {t.name for t in threading.enumerate() if t.is_alive()} - before  # the gate thread is gone too
