"""Re-inject dead letters into the topic they were read from (`trainwire dead-letters replay`).

For after a fix (a consumer that can now decode or accept them): each dead letter's original bytes go back, as they
were, to its topic, keyed by the run id when the payload still decodes far enough to name one (else an empty key).
Ingest reads them as new records; one still bad is dead-lettered again, at its new offset. A dead letter is recorded
as replayed once the transport has taken it, so a second replay skips it unless told `again`.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from trainwire.infra.log import LogProducer, TransportError
from trainwire.infra.log.base import DeliveryRefusedError
from trainwire.schemas import Codec, CodecUnavailableError

Letter = dict[str, Any]  # a row of `StoreReader.list_dead_letters`


@dataclass
class ReplayResult:
    replayed: list[Letter] = field(default_factory=list)  # injected (with dry_run: would be)
    skipped: list[Letter] = field(default_factory=list)  # replayed before, and not asked to again
    dry_run: bool = False


def replay_key(payload: bytes, codec: Codec) -> bytes:
    """The run id the payload names, as the producers key it; b"" when it does not decode that far. A schema
    registry that cannot answer is not "no run id": that stops the replay rather than mis-key a run's events."""
    try:
        _kind, fields = codec.decode_record(payload)
    except CodecUnavailableError:
        raise
    except Exception:  # whatever made it a dead letter may well stop it decoding: the key is unknown
        return b""
    run_id = fields.get("run_id") if isinstance(fields, dict) else None
    return run_id.encode() if isinstance(run_id, str) and run_id else b""


def replay_dead_letters(letters: list[Letter], producer: LogProducer | None, codec: Codec,
                        record: Callable[[list[Letter]], Any], again: bool = False, flush_timeout: float = 30.0
                        ) -> ReplayResult:
    """Inject `letters` (newest first, as `list_dead_letters` gives them) oldest first, so a run's records keep
    their order, and `record` them as replayed once every one is delivered. No producer: a dry run, which injects
    and records nothing."""
    result = ReplayResult(dry_run=producer is None)
    for letter in reversed(letters):
        (result.skipped if letter.get("replayed_at") and not again else result.replayed).append(letter)
    if producer is None or not result.replayed:
        return result
    for letter in result.replayed:
        payload = base64.b64decode(letter["payload_base64"])
        producer.append(letter["topic"], replay_key(payload, codec), payload)
    try:
        undelivered = producer.flush(flush_timeout)
    except DeliveryRefusedError as err:
        raise TransportError(f"{err}: of {len(result.replayed)} dead letters, none recorded as replayed (run the "
                             "replay again once the cause is fixed)") from err
    if undelivered:
        raise TransportError(f"{undelivered} of {len(result.replayed)} dead letters not delivered to the transport; "
                             "none recorded as replayed (run the replay again)")
    record([{"topic": d["topic"], "partition": d["partition"], "offset": d["offset"]} for d in result.replayed])
    return result
