"""Test sessions that share the plain broker: the last one out stops a broker that tests started, whichever session
started it; a broker the user started is never stopped. `down` here is a script that notes each call."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.broker_lease import BrokerLease

PORT = 9092


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    (tmp_path / f"broker-{PORT}.pid").write_text("4242\n")  # a broker is running
    return tmp_path


@pytest.fixture
def down(tmp_path: Path) -> Path:
    script = tmp_path / "down"
    script.write_text(f'#!/bin/sh\necho "$TRAINWIRE_KAFKA_PORT" >> "{tmp_path / "stopped"}"\n')
    script.chmod(0o755)
    return script


def stops(cache: Path) -> list[str]:
    return (cache / "stopped").read_text().split() if (cache / "stopped").exists() else []


def test_the_last_session_out_stops_the_broker_another_session_started(cache, down):
    first, second = BrokerLease(cache, PORT, down), BrokerLease(cache, PORT, down)
    first.take()
    first.started_it()
    second.take()
    assert "left running for another test session" in first.release()
    assert stops(cache) == []
    assert second.release() == f"stopped the Kafka broker the tests started on 127.0.0.1:{PORT}"
    assert stops(cache) == [str(PORT)]


def test_a_broker_the_user_started_is_never_stopped(cache, down):
    lease = BrokerLease(cache, PORT, down)
    lease.take()
    assert lease.release() is None and stops(cache) == []


def test_a_broker_started_by_hand_after_tests_stopped_theirs_is_left(cache, down):
    lease = BrokerLease(cache, PORT, down)
    lease.take()
    lease.started_it()
    (cache / f"broker-{PORT}.pid").write_text("5151\n")  # theirs was stopped by hand, the user started another
    assert lease.release() is None and stops(cache) == []
    lease.take()
    assert lease.release() is None and stops(cache) == []
