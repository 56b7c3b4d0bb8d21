"""A consumer catching up on a backlog must not page `run_stalled` for runs whose events it has not read yet:
their silence is its own lag (after a restart, an outage or a slow insert), and a false critical page on every
live run is what makes on-call stop trusting pages."""

import time
import types

from trainwire.consumers import ingest
from trainwire.consumers.service import build_ingest
from trainwire.infra.log import open_producer
from trainwire.infra.log.topics import topic_for
from trainwire.schemas import Heartbeat, encode

STEP_MS = 2_000  # how far the consumer's clock moves per poll


class Clock:
    """The ingest loop's wall clock, moved by the test: one poll takes STEP_MS of it."""

    def __init__(self):
        self.ms = time.time_ns() // 1_000_000

    def module(self):
        real = {name: getattr(time, name) for name in dir(time) if not name.startswith("_")}
        return types.SimpleNamespace(**{**real, "time_ns": lambda: self.ms * 1_000_000})


def heartbeats(settings, run_id: str, count: int, start_ms: int, every_ms: int, seq: int = 0) -> None:
    producer = open_producer(settings)
    for i in range(count):
        event = Heartbeat(run_id=run_id, experiment="backlog", host="node-1", seq=seq + i,
                          ts_ms=start_ms + i * every_ms, step=i)
        producer.append(settings.topic(topic_for("heartbeat")), run_id.encode(), encode(event))
    assert producer.flush(30) == 0
    producer.close()


def test_no_stall_is_paged_for_a_run_whose_events_wait_behind_a_backlog(local_settings, monkeypatch):
    settings = local_settings.model_copy(update={"batch_max_rows": 20})
    clock = Clock()
    monkeypatch.setattr(ingest, "time", clock.module())
    monkeypatch.setattr(ingest, "TICK_SECONDS", 0.0)  # the detectors' clock is judged at every poll
    alerts = []
    pipeline = build_ingest(settings, on_alert=alerts.append)
    try:
        start = clock.ms - 60_000
        heartbeats(settings, "run-a", 5, start, every_ms=5_000)  # expected interval 5 s: stalled after 15 s
        while pipeline.run_once(poll_timeout=0.1, force_flush=True):
            clock.ms += STEP_MS
        # 600 records of another run ahead of run-a's next heartbeat: 30 polls, a minute on the consumer's clock
        heartbeats(settings, "run-b", 600, start, every_ms=100)
        heartbeats(settings, "run-a", 1, start + 25_000, every_ms=5_000, seq=5)
        polls = 0
        while pipeline.run_once(poll_timeout=0.1, force_flush=True):
            clock.ms += STEP_MS
            polls += 1
        assert polls >= 30
        assert [a for a in alerts if a.rule == "run_stalled"] == []

        for _ in range(10):  # caught up, and now truly silent for 20 s: that is a stall
            clock.ms += STEP_MS
            pipeline.run_once(poll_timeout=0.0, force_flush=True)
        assert sorted(a.run_id for a in alerts if a.rule == "run_stalled" and a.state == "firing") == [
            "run-a", "run-b"]
    finally:
        pipeline.close()
