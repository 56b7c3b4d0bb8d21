"""The ingest retry loop: back-off grows until a batch is stored, one line per retry, and a failure to rewind
is retried like any other, never the end of the process."""

import logging

import pytest

from trainwire.consumers import ingest
from trainwire.consumers.ingest import IngestPipeline
from trainwire.consumers.writer import StoreWriteError, WriteResult
from trainwire.infra.log import TransportError
from trainwire.infra.log.sqlite import SqliteLogConsumer, SqliteLogProducer
from trainwire.infra.log.topics import EVENTS
from trainwire.schemas import Step, encode


class UnavailableStore:
    """Stands in for a ClickHouse server that is down (the writer's contract: StoreWriteError)."""

    def __init__(self, failures: int):
        self.failures = failures
        self.last_insert_seconds = 0.0

    def write(self, rows_by_kind, sources_by_kind=None) -> WriteResult:
        if self.failures:
            self.failures -= 1
            raise StoreWriteError("insert into ClickHouse failed: Code: 210. DB::NetExceptionNetwork\nstack line 2")
        return WriteResult(inserted=sum(len(rows) for rows in rows_by_kind.values()))

    def write_frames(self, frames) -> WriteResult:
        return self.write({kind: range(frame.table.num_rows) for kind, frame in frames.items()})

    def write_dead_letters(self, dead_letters) -> None:
        pass

    def forget_stored(self) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture
def settings(local_settings):
    settings = local_settings.model_copy(update={"batch_max_seconds": 60.0})
    producer = SqliteLogProducer(settings.local_log_path)
    for seq in range(5):
        producer.append(settings.topic(EVENTS), b"r", encode(Step(run_id="r", experiment="e", seq=seq, step=seq)))
    producer.close()
    return settings


def pipeline(settings, store, consumer_type=SqliteLogConsumer) -> IngestPipeline:
    consumer = consumer_type(settings.local_log_path, "ingest", [settings.topic(EVENTS)])
    return IngestPipeline(consumer, store, None, settings, on_alert=lambda alert: None)


def test_back_off_grows_until_a_batch_is_stored_and_logs_one_line_per_retry(settings, monkeypatch, caplog):
    slept = []
    monkeypatch.setattr(ingest.time, "sleep", slept.append)
    store = UnavailableStore(failures=6)
    under_test = pipeline(settings, store)
    with caplog.at_level(logging.WARNING, logger="trainwire.consumers.ingest"):
        for _ in range(8):
            under_test.run_once(poll_timeout=0)  # a good poll in between must not reset the back-off
            under_test.run_once(poll_timeout=0, force_flush=True)
    assert slept == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2]
    assert under_test.stats.stored == 5 and under_test.stats.retries == 6
    retries = [r for r in caplog.records if "re-reading" in r.getMessage()]
    assert len(retries) == 6
    assert all(r.exc_info is None and "\n" not in r.getMessage() for r in retries)

    store.failures = 1  # after progress, the next failure starts afresh
    slept.clear()
    under_test.flush()  # nothing held: no insert
    producer = SqliteLogProducer(settings.local_log_path)
    producer.append(settings.topic(EVENTS), b"r", encode(Step(run_id="r", experiment="e", seq=9, step=9)))
    producer.close()
    under_test.run_once(poll_timeout=0, force_flush=True)
    assert slept == [0.1]


class RewindTimesOut(SqliteLogConsumer):
    """A consumer whose rewind fails once, as `committed()` does after a lost Kafka session."""

    failed = False

    def rewind(self) -> None:
        if hasattr(self, "_position") and not RewindTimesOut.failed:
            RewindTimesOut.failed = True
            raise TransportError("kafka committed offsets: KafkaError{code=_TIMED_OUT}")
        super().rewind()


def test_a_failed_rewind_is_retried_not_fatal(settings, monkeypatch):
    monkeypatch.setattr(ingest.time, "sleep", lambda seconds: None)
    under_test = pipeline(settings, UnavailableStore(failures=1), RewindTimesOut)
    for _ in range(4):
        under_test.run_once(poll_timeout=0, force_flush=True)
    assert RewindTimesOut.failed
    assert under_test.stats.stored == 5 and under_test.stats.retries == 2


def test_the_dead_letter_budget_trips_on_a_run_or_a_share_and_forgets_a_dropped_batch():
    from trainwire.consumers.admission import DeadLetterBudget, DeadLetterLimitError

    budget = DeadLetterBudget(max_consecutive=5, max_ratio=0.5)
    for _ in range(4):
        budget.observe(True, "bad")
    budget.rollback()  # the batch was dropped: its dead letters will be seen again
    for _ in range(4):
        budget.observe(True, "bad")
    budget.observe(False)
    with pytest.raises(DeadLetterLimitError, match="5 records in a row"):
        for _ in range(5):
            budget.observe(True, "bad")

    share = DeadLetterBudget(max_consecutive=1_000, max_ratio=0.5)
    share.judge(400, 300)  # too few seen to judge a share
    share.commit(400, 300)
    share.judge(600, 0)
    share.commit(600, 0)
    with pytest.raises(DeadLetterLimitError, match="TRAINWIRE_DEAD_LETTER_MAX_RATIO"):
        share.judge(1_000, 900)
    share.judge(20_000, 10)  # a healthy stretch: the old dead letters age out of the window
