"""Topic names (before the configured prefix) and which event kind travels on which."""

import base64
import json

EVENTS = "events"  # run lifecycle, steps, evals, checkpoints, heartbeats; keyed by run id
GPU = "gpu"  # GPU samples; keyed by run id too, so a run's samples stay with its consumer
ALERTS = "alerts"
CONTROL = "control"  # stop commands to opted-in runs (docs/stop-switch.md); keyed by run id
DEAD_LETTERS = "dead-letters"  # records that could not become valid events, as JSON with the original bytes

_BY_KIND = {"gpu_sample": GPU, "alert": ALERTS, "stop_command": CONTROL}
# Made by the consumers, for people and runs, not telemetry to ingest.
CONSUMER_TOPICS = frozenset({ALERTS, CONTROL})


def topic_for(kind: str) -> str:
    return _BY_KIND.get(kind, EVENTS)


def dead_letter_message(topic: str, partition: int, offset: int, reason: str, payload: bytes) -> bytes:
    return json.dumps({"topic": topic, "partition": partition, "offset": offset, "reason": reason,
                       "payload_base64": base64.b64encode(payload).decode()}).encode()
