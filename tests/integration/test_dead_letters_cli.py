"""`trainwire dead-letters list|replay` through the real CLI, real ingest (`trainwire consume --drain`) and real chdb,
on the local log and on the real broker; and beside `trainwire up`, through its API.

Records that stay poison show that a replay puts the very bytes back on their topic (read back with a consumer,
keyed by run id where the payload names one) and that ingest dead-letters them again, with the same reason, at
their new offsets. A record refused until a fix (ingest's accepted time window, widened) shows a replay storing it.
"""

import base64
import json
import os
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone

from beside_up import running_up
from tests.acting import roles_file

from trainwire.infra.config import Settings
from trainwire.infra.log import open_consumer, open_producer
from trainwire.infra.log.topics import EVENTS
from trainwire.infra.store import connect_store
from trainwire.infra.store.read import StoreReader
from trainwire.schemas import Step, encode

RUN = "r-dead-letters"


def env_for(settings: Settings) -> dict[str, str]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TRAINWIRE_")},
           "TRAINWIRE_HOME": str(settings.home), "TRAINWIRE_TOPIC_PREFIX": settings.topic_prefix,
           "TRAINWIRE_BATCH_MAX_SECONDS": "0.2"}
    return {**env, "TRAINWIRE_KAFKA": settings.kafka} if settings.kafka else env


def trainwire(settings: Settings, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "trainwire", *args], env={**env_for(settings), **(env or {})},
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, f"trainwire {' '.join(args)}: {result.stderr[-3000:]}"
    return result


def as_json(settings: Settings, *args: str):
    return json.loads(trainwire(settings, *args, "--json").stdout)


def poison(settings: Settings) -> dict[bytes, bytes]:
    """A valid step and two records ingest refuses (an invalid step naming its run, bytes that are not Avro) on
    the events topic: {payload: key it was sent with}."""
    valid = Step(run_id=RUN, experiment="dead-letters", seq=1, step=1, loss=1.0)
    invalid = encode(Step.model_construct(**{**valid.model_dump(), "seq": 2, "step": -5}))
    sent = {encode(valid): RUN.encode(), invalid: RUN.encode(), b"\x00\x01 not avro at all": b"some-key"}
    producer = open_producer(settings)
    for payload, key in sent.items():
        producer.append(settings.topic(EVENTS), key, payload)
    assert producer.flush(30) == 0
    producer.close()
    return {payload: key for payload, key in list(sent.items())[1:]}


def records_on(settings: Settings, topic: str, expected: int, timeout: float = 60) -> list:
    """Everything on `topic`, read by a consumer group of its own, once `expected` records are there and a quiet
    second has brought no more."""
    consumer = open_consumer(settings, f"read-back-{uuid.uuid4().hex[:8]}", [topic])
    records, deadline, quiet_since = [], time.monotonic() + timeout, None
    try:
        while time.monotonic() < deadline:
            batch = consumer.poll(100, 0.2)
            records += batch
            if batch or len(records) < expected:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > 1.0:
                break
    finally:
        consumer.close()
    return records


def payloads(letters: list[dict]) -> list[bytes]:
    return sorted(base64.b64decode(d["payload_base64"]) for d in letters)


def test_dead_letters_are_listed_and_replayed_once_into_the_topic_they_came_from(any_settings):
    settings, topic = any_settings, any_settings.topic(EVENTS)
    bad = poison(settings)
    trainwire(settings, "consume", "--drain")

    letters = as_json(settings, "dead-letters", "list")
    assert payloads(letters) == sorted(bad) and all(d["topic"] == topic and d["replayed_at"] is None for d in letters)
    reason = {base64.b64decode(d["payload_base64"]): d["reason"] for d in letters}
    invalid, garbage = sorted(bad, key=len, reverse=True)
    assert reason[invalid].startswith("InvalidEventError") and "greater than or equal to 0" in reason[invalid]
    assert reason[garbage].startswith("CorruptPayloadError: not an Avro single-object message")
    assert [d["ts"] for d in letters] == sorted((d["ts"] for d in letters), reverse=True), "newest first"
    human = trainwire(settings, "dead-letters", "list").stdout
    header, *rows = human.rstrip("\n").split("\n")
    assert header.split()[:6] == ["Time", "(UTC)", "Topic", "Partition", "Offset", "Reason"]
    for letter in letters:
        assert any(row.split()[2:5] == [topic, str(letter["partition"]), str(letter["offset"])]
                   and letter["reason"][:60] in row for row in rows)

    assert payloads(as_json(settings, "dead-letters", "list", "--reason-contains", "corrupt")) == [garbage]
    assert as_json(settings, "dead-letters", "list", "--topic", "no-such-topic") == []
    assert len(as_json(settings, "dead-letters", "list", "--since", "1h")) == 2
    future = (datetime.now(timezone.utc) + timedelta(minutes=5)).isoformat()
    assert as_json(settings, "dead-letters", "list", "--since", future) == []
    assert len(as_json(settings, "dead-letters", "list", "--limit", "1")) == 1

    dry = as_json(settings, "dead-letters", "replay", "--dry-run")
    assert (dry["dry_run"], dry["replayed"], dry["skipped"]) == (True, 2, 0)
    replayed = as_json(settings, "dead-letters", "replay")
    assert (replayed["dry_run"], replayed["replayed"], replayed["skipped"]) == (False, 2, 0)
    again = trainwire(settings, "dead-letters", "replay").stdout
    assert "replayed 0 dead letter(s)" in again and "skipped 2 replayed before" in again

    # The dry run and the second replay injected nothing; the replay put each payload back once, keyed by run id
    # where it decodes far enough to name one
    on_topic = records_on(settings, topic, expected=5)
    assert len(on_topic) == 5
    first_read_at = {(d["partition"], d["offset"]) for d in letters}
    replays = [(r.value, r.key) for r in on_topic if r.value in bad and (r.partition, r.offset) not in first_read_at]
    assert sorted(replays) == sorted([(invalid, RUN.encode()), (garbage, b"")])
    listed = as_json(settings, "dead-letters", "list")
    assert all(d["replayed_at"] and d["replayed_by"] for d in listed)

    # Still poison: ingest dead-letters them again, same reasons, at their new offsets, not yet replayed
    trainwire(settings, "consume", "--drain")
    listed = as_json(settings, "dead-letters", "list")
    fresh = [d for d in listed if d["replayed_at"] is None]
    assert len(listed) == 4 and payloads(fresh) == sorted(bad)
    assert {base64.b64decode(d["payload_base64"]): d["reason"] for d in fresh} == reason
    assert first_read_at.isdisjoint((d["partition"], d["offset"]) for d in fresh)
    assert (lambda r: (r["replayed"], r["skipped"]))(as_json(settings, "dead-letters", "replay", "--dry-run")) == (2, 2)
    assert as_json(settings, "dead-letters", "replay", "--dry-run", "--again")["replayed"] == 4


def test_a_replay_after_the_fix_stores_what_ingest_refused(any_settings):
    """A trainer's clock three days ahead: ingest refuses its step (outside the accepted window) until the window is
    widened; the replay then brings the very record back, and it is stored."""
    settings = any_settings
    ahead = Step(run_id=RUN, experiment="dead-letters", seq=1, step=7, loss=0.25,
                 ts_ms=int((datetime.now(timezone.utc) + timedelta(days=3)).timestamp() * 1000))
    producer = open_producer(settings)
    producer.append(settings.topic(EVENTS), RUN.encode(), encode(ahead))
    assert producer.flush(30) == 0
    producer.close()
    trainwire(settings, "consume", "--drain")
    (letter,) = as_json(settings, "dead-letters", "list", "--reason-contains", "outside the accepted window")
    assert base64.b64decode(letter["payload_base64"]) == encode(ahead)

    widened = {"TRAINWIRE_ACCEPT_DAYS_AHEAD": "7"}  # the fix
    assert as_json(settings, "dead-letters", "replay", "--reason-contains", "accepted window")["replayed"] == 1
    trainwire(settings, "consume", "--drain", env=widened)
    (after,) = as_json(settings, "dead-letters", "list")
    assert after["offset"] == letter["offset"] and after["replayed_at"], "no new dead letter: it was stored"
    client = connect_store(settings.store_dsn)
    try:
        assert [(s["step"], s["loss"]) for s in StoreReader(client).steps(RUN)] == [(7, 0.25)]
    finally:
        client.close()


def test_a_replay_the_transport_does_not_take_is_not_recorded(local_settings):
    settings = local_settings
    bad = poison(settings)
    trainwire(settings, "consume", "--drain")
    unreachable = {**env_for(settings), "TRAINWIRE_KAFKA": "127.0.0.1:1", "TRAINWIRE_FLUSH_TIMEOUT_SECONDS": "1"}
    failed = subprocess.run([sys.executable, "-m", "trainwire", "dead-letters", "replay"], env=unreachable,
                            capture_output=True, text=True, timeout=120)
    # Kafka is checked before anything is replayed (exit 5, README's exit codes): one line, nothing recorded
    assert failed.returncode == 5 and failed.stderr.count("\n") == 1 and "check TRAINWIRE_KAFKA" in failed.stderr
    letters = as_json(settings, "dead-letters", "list")
    assert payloads(letters) == sorted(bad) and not any(d["replayed_at"] for d in letters)
    assert as_json(settings, "dead-letters", "replay")["replayed"] == 2  # once the transport takes them


def test_beside_up_list_and_replay_go_through_its_api(tmp_path):
    settings = Settings(home=tmp_path / "home")
    roles_file(settings.home / "roles.toml")  # the test's OS user replays as oncall
    with running_up(settings.home):
        bad = poison(settings)
        letters = wait_for_letters(settings, 2)
        assert payloads(letters) == sorted(bad)
        replayed = as_json(settings, "dead-letters", "replay", "--actor", "oncall")
        assert (replayed["replayed"], replayed["skipped"]) == (2, 0)
        listed = wait_for_letters(settings, 4)  # up's ingest read the replays and dead-lettered them again
        assert sorted((d["offset"], d["replayed_by"]) for d in listed if d["replayed_at"]) == sorted(
            (d["offset"], "oncall") for d in letters)
        second = as_json(settings, "dead-letters", "replay", "--dry-run")
        assert (second["replayed"], second["skipped"]) == (2, 2)
    assert not (settings.home / "up.json").exists()
    assert as_json(settings, "dead-letters", "list") == listed  # up is gone: the CLI opens the store itself


def wait_for_letters(settings: Settings, count: int, timeout: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout
    while len(letters := as_json(settings, "dead-letters", "list")) < count and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(letters) == count, letters
    return letters
