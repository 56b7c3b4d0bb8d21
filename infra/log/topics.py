"""Topic names (before the configured prefix) and which event kind travels on which."""

EVENTS = "events"  # run lifecycle, steps, evals, checkpoints, heartbeats; keyed by run id
GPU = "gpu"  # GPU samples; keyed by run id too, so a run's samples stay with its consumer
ALERTS = "alerts"

_BY_KIND = {"gpu_sample": GPU, "alert": ALERTS}


def topic_for(kind: str) -> str:
    return _BY_KIND.get(kind, EVENTS)
