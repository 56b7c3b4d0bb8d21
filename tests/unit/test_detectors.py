import math

from trainwire.consumers.detectors import DetectorEngine

RUN = {"run_id": "run-a", "experiment": "exp", "team": "", "ts_ms": 0, "seq": 0}


def steps(engine, losses, grad_norms=None, run=RUN):
    alerts = []
    for i, loss in enumerate(losses):
        record = {**run, "seq": i, "step": i + 1, "loss": loss,
                  "grad_norm": grad_norms[i] if grad_norms else 1.0}
        alerts += engine.observe("step", record)
    return alerts


def healthy(n=200):
    return [0.4 + 2.5 * math.exp(-i / 50) * (1 + 0.01 * math.sin(i)) for i in range(n)]


def test_healthy_curve_is_silent():
    assert steps(DetectorEngine(), healthy()) == []


def test_nan_fires_once_per_incident_and_resolves():
    losses = healthy(20) + [math.nan] * 5 + healthy(40)[20:]
    alerts = [a for a in steps(DetectorEngine(), losses) if a.rule == "loss_not_finite"]
    assert [(a.state, a.step, a.severity) for a in alerts] == [("firing", 21, "block"), ("resolved", 26, "block")]
    assert alerts[0].dedup_key == alerts[1].dedup_key


def test_infinite_loss_is_not_finite():
    alerts = steps(DetectorEngine(), [1.0, math.inf])
    assert [a.rule for a in alerts] == ["loss_not_finite"]


def test_spike_over_half_above_recent_median():
    losses = [1.0] * 10 + [1.49, 1.6, 1.7, 1.0]
    alerts = [a for a in steps(DetectorEngine(), losses) if a.rule == "loss_spike"]
    assert [(a.state, a.step) for a in alerts] == [("firing", 12), ("resolved", 14)]
    assert alerts[0].threshold == 1.5 and alerts[0].value == 1.6


def test_grad_norm_above_ten():
    alerts = steps(DetectorEngine(), [1.0] * 4, grad_norms=[10.0, 10.5, 12.0, 3.0])
    assert [(a.rule, a.state, a.step) for a in alerts] == [
        ("grad_norm_high", "firing", 2), ("grad_norm_high", "resolved", 4)]


def test_runs_are_independent():
    engine = DetectorEngine()
    steps(engine, [1.0] * 10)
    other = {**RUN, "run_id": "run-b"}
    assert steps(engine, [1.0, 1.7], run=other) == []  # run-b has no history yet: no spike baseline


def test_replayed_incident_has_the_same_alert_id():
    first = steps(DetectorEngine(), [1.0, math.nan])
    again = steps(DetectorEngine(), [1.0, math.nan])
    assert [a.event_id for a in first] == [a.event_id for a in again]
