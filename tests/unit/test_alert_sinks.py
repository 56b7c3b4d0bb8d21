"""Alert sinks against a real local HTTP server: the payload each service expects, routing, retries with back-off,
no duplicate pages, a sink that stays down not holding up the others, and configuration errors."""

import json
import math
import time

import pytest

from tests.recording_server import RecordingServer
from trainwire.consumers.alerting.dispatcher import Dispatcher
from trainwire.consumers.alerting.outbox import Outbox
from trainwire.consumers.alerting.sinks import SinkError, build_sinks
from trainwire.infra.alerting_settings import AlertingSettings, SinkSettings
from trainwire.infra.config import ConfigError, load_settings
from trainwire.schemas import Alert

WAIT = 10.0


def alert(*, state="firing", severity="block", team="nlp", key="run-1/loss_not_finite/5", rule="loss_not_finite",
          value=math.nan) -> Alert:
    return Alert(run_id="run-1", experiment="llama-sft", team=team, ts_ms=1_700_000_000_000, rule=rule,
                 severity=severity, state=state, step=5, value=value, threshold=None,
                 message="train loss is nan at step 5", dedup_key=key)


def sink(kind, server=None, **options):
    url = "" if server is None else f"{server.url}/v2/enqueue" if kind == "pagerduty" else server.url
    return build_sinks(AlertingSettings(sinks=[SinkSettings(kind=kind, url=url, **options)],
                                        dashboard_url="http://ops:8501"))[0]


@pytest.fixture
def server():
    with RecordingServer() as server:
        yield server


def test_webhook_posts_the_alert_as_json_with_non_finite_values_named(server):
    sink("webhook", server, headers={"Authorization": "Bearer s3cret"}).deliver(alert())
    [received] = server.received
    assert received.headers["Authorization"] == "Bearer s3cret"
    body = received.body
    assert body["run_id"] == "run-1" and body["rule"] == "loss_not_finite" and body["severity"] == "block"
    assert body["value"] == "nan" and body["threshold"] is None and body["step"] == 5
    assert body["dedup_key"] == "run-1/loss_not_finite/5" and body["state"] == "firing"
    assert body["time"] == "2023-11-14T22:13:20.000Z" and body["link"] == "http://ops:8501/?run=run-1"


def test_every_http_sink_sends_an_idempotency_key_that_names_the_page(server):
    """A page sent again (its sender died before it knew the outcome) carries the key it carried the first time."""
    webhook, other = sink("webhook", server), sink("webhook", server, name="other")
    webhook.deliver(alert())
    webhook.deliver(alert())  # the same page, another attempt (another event id, even)
    webhook.deliver(alert(state="resolved"))
    other.deliver(alert())
    sink("pagerduty", server, routing_key="k").deliver(alert())
    keys = [{k.lower(): v for k, v in r.headers.items()}["idempotency-key"] for r in server.received]
    assert keys[0] == keys[1] and len(set(keys)) == 4


def test_pagerduty_triggers_and_resolves_by_dedup_key(server):
    pagerduty = sink("pagerduty", server, routing_key="R0UT1NG")
    pagerduty.deliver(alert())
    pagerduty.deliver(alert(state="resolved"))
    trigger, resolve = server.bodies("/v2/enqueue")
    assert trigger["routing_key"] == "R0UT1NG" and trigger["event_action"] == "trigger"
    assert trigger["dedup_key"] == resolve["dedup_key"] == "run-1/loss_not_finite/5"
    payload = trigger["payload"]
    assert payload["severity"] == "critical" and payload["source"] == "run-1" and payload["class"] == "loss_not_finite"
    assert payload["component"] == "llama-sft" and payload["group"] == "nlp"
    assert "loss_not_finite on run run-1" in payload["summary"] and len(payload["summary"]) <= 1024
    assert payload["custom_details"]["step"] == 5 and trigger["links"][0]["href"] == "http://ops:8501/?run=run-1"
    assert resolve == {"routing_key": "R0UT1NG", "dedup_key": "run-1/loss_not_finite/5", "event_action": "resolve"}


def test_pagerduty_defaults_to_the_public_events_endpoint():
    settings = SinkSettings(kind="pagerduty", routing_key="k")
    assert settings.endpoint == "https://events.pagerduty.com/v2/enqueue"


def test_slack_message_has_text_and_blocks(server):
    sink("slack", server).deliver(alert(severity="critical", rule="loss_spike", value=4.2))
    [body] = server.bodies()
    assert body["text"].startswith(":red_circle: [CRITICAL] loss_spike on run run-1")
    assert body["blocks"][0]["text"]["text"] == body["text"]
    assert "<http://ops:8501/?run=run-1|open the run>" in body["blocks"][1]["elements"][0]["text"]


def test_alertmanager_gets_labels_and_an_end_time(server):
    manager = sink("alertmanager", server)
    manager.deliver(alert())
    manager.deliver(alert(state="resolved"))
    firing, resolved = server.bodies("/api/v2/alerts")
    assert firing[0]["labels"] == {"alertname": "loss_not_finite", "run_id": "run-1", "experiment": "llama-sft",
                                   "severity": "block", "team": "nlp", "dedup_key": "run-1/loss_not_finite/5",
                                   "source": "trainwire"}
    assert firing[0]["startsAt"] == "2023-11-14T22:13:20.000Z" and firing[0]["endsAt"] == "2023-11-15T22:13:20.000Z"
    assert resolved[0]["endsAt"] == resolved[0]["startsAt"]  # resolved when it cleared
    assert firing[0]["generatorURL"] == "http://ops:8501/?run=run-1"


def test_routes_by_severity_team_and_state():
    routed = sink("console", severities=("critical", "block"), teams=("nlp",), states=("firing",))
    assert routed.accepts(alert())
    assert not routed.accepts(alert(severity="warning"))
    assert not routed.accepts(alert(team="vision"))
    assert not routed.accepts(alert(state="resolved"))
    assert sink("console").accepts(alert(severity="info", team="", state="resolved"))  # default: everything


def test_http_errors_say_whether_a_retry_can_help(server):
    webhook = sink("webhook", server)
    server.fail_next, server.fail_status = 1, 503
    with pytest.raises(SinkError, match="HTTP 503") as unavailable:
        webhook.deliver(alert())
    assert unavailable.value.retryable
    server.fail_next, server.fail_status = 1, 400
    with pytest.raises(SinkError, match="HTTP 400") as refused:
        webhook.deliver(alert())
    assert not refused.value.retryable
    server.fail_next, server.fail_status = 1, 429
    with pytest.raises(SinkError) as limited:
        webhook.deliver(alert())
    assert limited.value.retryable
    unreachable = build_sinks(AlertingSettings(sinks=[SinkSettings(kind="webhook", url="http://127.0.0.1:9")]))[0]
    with pytest.raises(SinkError, match="cannot reach") as down:
        unreachable.deliver(alert())
    assert down.value.retryable


class Deliveries:
    """An outbox and dispatcher over the given sinks, as the alert consumer runs them."""

    def __init__(self, tmp_path, sinks, **settings):
        self.settings = AlertingSettings(sinks=[s.settings for s in sinks], retry_initial_seconds=0.05,
                                         retry_max_seconds=0.2, **settings)
        self.outbox = Outbox(tmp_path / "outbox.db")
        self.sinks = sinks
        self.dispatcher = Dispatcher(sinks, self.outbox, self.settings).start()

    def send(self, *alerts):
        deliveries = [(s.name, a) for a in alerts for s in self.sinks if s.accepts(a)]
        new = self.outbox.enqueue(deliveries)
        self.dispatcher.wake({name for name, _ in deliveries})
        return new

    def settled(self, sink_name, timeout=WAIT):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            [row] = [r for r in self.outbox.summary() if r["sink"] == sink_name]
            if not row["pending"]:
                return row
            time.sleep(0.05)
        raise AssertionError(f"{sink_name} still has pending pages: {self.outbox.summary()}")

    def close(self):
        self.dispatcher.stop()
        self.outbox.close()


def test_a_failing_sink_is_retried_with_backoff_until_it_delivers_once(tmp_path, server):
    server.fail_next = 3
    deliveries = Deliveries(tmp_path, [sink("webhook", server)])
    try:
        deliveries.send(alert())
        row = deliveries.settled("webhook")
        assert row["delivered"] == 1 and row["failed"] == 0
        assert server.refused == 3 and len(server.received) == 1
        counts = deliveries.dispatcher.counts()["webhook"]
        assert counts == {"delivered": 1, "retried": 3, "failed": 0}
    finally:
        deliveries.close()


def test_the_same_alert_delivered_twice_pages_once(tmp_path, server):
    deliveries = Deliveries(tmp_path, [sink("pagerduty", server, routing_key="k")])
    try:
        assert deliveries.send(alert(), alert()) == 1  # twice in one batch
        deliveries.settled("pagerduty")
        assert deliveries.send(alert()) == 0  # again after it went out: a redelivery from Kafka
        assert deliveries.send(alert(state="resolved")) == 1
        deliveries.settled("pagerduty")
        time.sleep(0.3)
        assert [b["event_action"] for b in server.bodies()] == ["trigger", "resolve"]
    finally:
        deliveries.close()


def test_the_outbox_remembers_deliveries_across_restarts(tmp_path, server):
    first = Deliveries(tmp_path, [sink("webhook", server)])
    first.send(alert())
    first.settled("webhook")
    first.close()
    second = Deliveries(tmp_path, [sink("webhook", server)])
    try:
        assert second.send(alert()) == 0
        time.sleep(0.3)
        assert len(server.received) == 1
    finally:
        second.close()


def test_a_sink_that_stays_down_does_not_hold_up_the_others(tmp_path, server):
    down = build_sinks(AlertingSettings(sinks=[SinkSettings(kind="webhook", name="down", url="http://127.0.0.1:9",
                                                            timeout_seconds=1)]))[0]
    deliveries = Deliveries(tmp_path, [down, sink("webhook", server, name="up")])
    try:
        for step in range(5):
            deliveries.send(alert(key=f"run-1/loss_not_finite/{step}"))
        assert deliveries.settled("up")["delivered"] == 5
        time.sleep(0.5)
        [down_row] = [r for r in deliveries.outbox.summary() if r["sink"] == "down"]
        assert down_row["pending"] == 5 and "cannot reach" in down_row["last_error"]
        assert deliveries.dispatcher.counts()["down"]["retried"] >= 5
    finally:
        deliveries.close()


def test_a_refused_page_fails_at_once_and_a_page_too_old_gives_up(tmp_path, server):
    server.always_status = 400
    deliveries = Deliveries(tmp_path, [sink("webhook", server)])
    try:
        deliveries.send(alert())
        row = deliveries.settled("webhook")
        assert row["failed"] == 1 and server.refused == 1 and "HTTP 400" in row["last_error"]
        assert deliveries.outbox.failures()[0]["dedup_key"] == "run-1/loss_not_finite/5"
    finally:
        deliveries.close()
    server.always_status = 503
    impatient = Deliveries(tmp_path / "second", [sink("webhook", server)], give_up_after_seconds=0.3)
    try:
        impatient.send(alert())
        row = impatient.settled("webhook")
        assert row["failed"] == 1 and row["delivered"] == 0 and server.refused > 1
    finally:
        impatient.close()


def test_a_resolution_waits_for_its_firing_page(tmp_path, server):
    server.fail_next = 2
    deliveries = Deliveries(tmp_path, [sink("pagerduty", server, routing_key="k")])
    try:
        deliveries.send(alert(), alert(state="resolved"))
        deliveries.settled("pagerduty")
        assert [b["event_action"] for b in server.bodies()] == ["trigger", "resolve"]
    finally:
        deliveries.close()


@pytest.mark.parametrize("config, complaint", [
    ('[[alerting.sinks]]\nkind = "pager"\n', "alerting.sinks.0.kind"),
    ('[[alerting.sinks]]\nkind = "webhook"\n', "a webhook sink needs a url"),
    ('[[alerting.sinks]]\nkind = "pagerduty"\n', "a pagerduty sink needs a routing_key"),
    ('[[alerting.sinks]]\nkind = "slack"\nurl = "hooks.slack.com/x"\n', "alerting.sinks.0.url"),
    ('[[alerting.sinks]]\nkind = "console"\nseverity = ["block"]\n', "alerting.sinks.0.severity"),
    ('[[alerting.sinks]]\nkind = "console"\n[[alerting.sinks]]\nkind = "console"\n', "sink names must be unique"),
])
def test_bad_sink_configuration_fails_at_start_naming_the_key(tmp_path, monkeypatch, config, complaint):
    path = tmp_path / "trainwire.toml"
    path.write_text(config)
    monkeypatch.setenv("TRAINWIRE_CONFIG", str(path))
    with pytest.raises(ConfigError, match=complaint):
        load_settings()


def test_sinks_are_configured_in_the_config_file(tmp_path, monkeypatch):
    path = tmp_path / "trainwire.toml"
    path.write_text('[alerting]\ndashboard_url = "http://ops:8501"\n'
                    '[[alerting.sinks]]\nkind = "pagerduty"\nrouting_key = "abc"\nseverities = ["critical", "block"]\n'
                    '[[alerting.sinks]]\nkind = "slack"\nurl = "https://hooks.slack.com/services/T/B/X"\n'
                    'teams = ["nlp"]\n')
    monkeypatch.setenv("TRAINWIRE_CONFIG", str(path))
    monkeypatch.delenv("TRAINWIRE_ALERTING", raising=False)
    settings = load_settings()
    names = [s.name for s in build_sinks(settings.alerting)]
    assert names == ["pagerduty", "slack"] and settings.alerting.dashboard_url == "http://ops:8501"
    assert settings.alerting.sinks[0].severities == ("critical", "block")


def test_cli_sends_a_test_page_and_shows_delivery_status(tmp_path, monkeypatch, server, capsys):
    from trainwire.cli import main
    from trainwire.consumers.alerting.service import outbox_path

    config = tmp_path / "trainwire.toml"
    config.write_text(f'home = "{tmp_path / "home"}"\n[[alerting.sinks]]\nkind = "webhook"\nurl = "{server.url}"\n'
                      f'[[alerting.sinks]]\nkind = "slack"\nurl = "{server.url}/slack"\nseverities = ["block"]\n')
    monkeypatch.setenv("TRAINWIRE_CONFIG", str(config))
    assert main(["alerts", "test", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results == [{"sink": "webhook", "result": "delivered"},
                       {"sink": "slack", "result": "not routed (critical is not in its route)"}]
    assert server.bodies()[0]["rule"] == "test_page"

    outbox = Outbox(outbox_path(load_settings()))
    outbox.enqueue([("webhook", alert())])
    outbox.failed(outbox.claim("webhook"), "HTTP 400 bad payload")
    outbox.close()
    assert main(["alerts", "status"]) == 1  # a failed page is worth a non-zero exit
    human = capsys.readouterr().out
    header, row = human.split("\n")[:2]
    assert header.split()[:4] == ["Sink", "Pending", "Delivered", "Failed"] and row.split()[:4] == ["webhook", "0",
                                                                                                 "0", "1"]
    assert "HTTP 400 bad payload" in human
