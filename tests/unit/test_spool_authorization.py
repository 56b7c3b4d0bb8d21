"""A broker that refuses the trainer's principal a topic (ACLs) must not cost its events: a grant may come, and until
then the events wait in the spool, said once, not once per event (seen on the secured broker: every event of a run
went to the rejected table, one error line each)."""

import logging
import socket

from confluent_kafka import KafkaError

from trainwire.infra.config import Settings
from trainwire.infra.log.spool import SpoolingProducer


def closed_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def test_events_refused_by_an_acl_stay_spooled_and_are_said_once(tmp_path, caplog):
    # a producer librdkafka refuses to build: no forwarder thread races the test for the spooled rows
    settings = Settings(home=tmp_path, kafka=closed_port(), kafka_client={"socket.timeout.ms": "never"})
    producer = SpoolingProducer(settings, tmp_path / "spool")
    try:
        spool = producer._own  # noqa: SLF001 - the broker's answer is given to the real spool's delivery path
        spool.write([("t.alerts", b"run", f"event-{i}".encode()) for i in range(50)])
        rows = spool.read(50)
        refused = KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED, "Broker: Topic authorization failed")
        with caplog.at_level(logging.WARNING, logger="trainwire"):
            for row in rows:
                spool.outstanding.append(row[0])
                producer._delivered(spool, row, refused)  # noqa: SLF001
        assert producer.rejected == 0 and producer.undelivered() == 50, "kept spooled, not set aside for good"
        lines = [r.getMessage() for r in caplog.records if "t.alerts" in r.getMessage()]
        assert len(lines) == 1 and "may not write to t.alerts" in lines[0], lines
    finally:
        producer.close()
    assert len(list((tmp_path / "spool").glob("*.db"))) == 1, "the spool stays for the next start or spool replay"
