"""Where alerts go: the console, a generic JSON webhook, PagerDuty (Events API v2), Slack (incoming webhooks) and
Prometheus Alertmanager (`/api/v2/alerts`). Each sink routes the alerts its settings select and delivers one alert
at a time; a failure raises `SinkError`, and the dispatcher retries the retryable ones with back-off.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import sys
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from typing import Protocol
from urllib.parse import unquote, urlsplit

from trainwire.infra.alerting_settings import AlertingSettings, SinkSettings
from trainwire.infra.redact import redact_text, redact_url
from trainwire.schemas import Alert

from .outbox import Delivery

log = logging.getLogger(__name__)
USER_AGENT = "trainwire-alerts/1"
RETRYABLE_HTTP = frozenset({408, 425, 429})  # and every 5xx
PAGERDUTY_SEVERITY = {"block": "critical", "critical": "critical", "warning": "warning", "info": "info"}
SLACK_ICON = {"block": ":rotating_light:", "critical": ":red_circle:", "warning": ":warning:", "info": ":information_source:"}
# Alertmanager resolves an alert that is not sent again within its resolve_timeout unless endsAt says otherwise;
# a firing incident is sent once, so it is sent with an endsAt this far ahead (its resolution sets the real one).
ALERTMANAGER_FIRING_FOR = timedelta(hours=24)
SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2, "block": 3}
BUNDLE_WHY = {"rate_limited": " (held back by the rate limit)", "silence_ended": " (still firing when a silence ended)"}
LISTED_RUNS = 10  # in a bundle's one-line summary; the payloads list them all


class SinkError(RuntimeError):
    """Delivery failed. `retryable`: worth trying again later (endpoint down, rate limited, timed out); otherwise the
    endpoint refused the page itself (bad key, bad payload) and retrying would not help."""

    def __init__(self, message: str, retryable: bool = True):
        super().__init__(message)
        self.retryable = retryable


class Sink(Protocol):
    name: str
    pages_people: bool  # honours silences, grouping, flapping and the rate limit (the stop switch does not)

    def accepts(self, alert: Alert) -> bool: ...

    def deliver(self, alert: Alert) -> None: ...

    def close(self) -> None: ...


def describe(alert: Alert) -> str:
    """One line a person reads first: what, where, how bad."""
    step = f" at step {alert.step}" if alert.step is not None else ""
    verb = "RESOLVED" if alert.state == "resolved" else alert.severity.upper()
    return f"[{verb}] {alert.rule} on run {alert.run_id} ({alert.experiment}){step}: {alert.message}"


def runs_of(alerts: tuple[Alert, ...]) -> list[str]:
    return list(dict.fromkeys(alert.run_id for alert in alerts))


def describe_bundle(delivery: Delivery) -> str:
    """One line for a page of several incidents: what, on how many runs, which."""
    alerts, runs = delivery.members, runs_of(delivery.members)
    rules = sorted({a.rule for a in alerts})
    experiments = sorted({a.experiment for a in alerts})
    worst = max((a.severity for a in alerts), key=SEVERITY_RANK.__getitem__)
    verb = "RESOLVED" if delivery.alert.state == "resolved" else worst.upper()
    what = f"{rules[0]} on {len(runs)} runs" if len(rules) == 1 else f"{len(alerts)} incidents ({', '.join(rules)})"
    where = f" ({experiments[0]})" if len(experiments) == 1 else ""
    listed = ", ".join(runs[:LISTED_RUNS]) + (f" and {len(runs) - LISTED_RUNS} more" if len(runs) > LISTED_RUNS
                                              else "")
    return f"[{verb}] {what}{where}{BUNDLE_WHY.get(delivery.kind, '')}: {listed}"


def alert_time(alert: Alert) -> datetime:
    return datetime.fromtimestamp(alert.ts_ms / 1000, UTC)


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _finite(value: float | None) -> float | str | None:
    """JSON has no NaN or Infinity: a non-finite value is sent as its name."""
    return value if value is None or math.isfinite(value) else str(value)


def idempotency_key(sink_name: str, alert: Alert) -> str:
    """The same for every attempt at one page (sink, de-duplication key, state), so a receiver can drop a re-send:
    the alert consumer sends a page again when the process sending it died before it knew the outcome."""
    page = "\n".join((sink_name, alert.dedup_key, alert.state)).encode()
    return f"trainwire-{hashlib.sha256(page).hexdigest()[:32]}"


def run_link(dashboard_url: str, alert: Alert) -> str:
    return f"{dashboard_url.rstrip('/')}/?run={alert.run_id}" if dashboard_url else ""


class RoutedSink:
    """The routing every sink shares: severities, teams and states from its settings."""

    pages_people = True

    def __init__(self, settings: SinkSettings):
        self.settings = settings
        self.name = settings.sink_name
        self._secrets = settings.secrets()

    def accepts(self, alert: Alert) -> bool:
        s = self.settings
        return alert.severity in s.severities and alert.state in s.states and (not s.teams or alert.team in s.teams)

    def redact(self, text: str) -> str:
        """`text` without this sink's secrets: for everything printed, logged or stored about it."""
        return redact_text(text, self._secrets)

    def deliver(self, alert: Alert) -> None:
        raise NotImplementedError

    def deliver_bundle(self, delivery: Delivery) -> None:
        """One page for several incidents (a storm's batch, what a rate limit or a silence held back)."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class ConsoleSink(RoutedSink):
    def deliver(self, alert: Alert) -> None:
        print(f"ALERT {describe(alert)}", file=sys.stderr, flush=True)

    def deliver_bundle(self, delivery: Delivery) -> None:
        print(f"ALERT {describe_bundle(delivery)}", file=sys.stderr, flush=True)


class HttpSink(RoutedSink):
    """POSTs one JSON document per alert, with an `Idempotency-Key` header; 2xx is delivered."""

    def __init__(self, settings: SinkSettings, dashboard_url: str = ""):
        super().__init__(settings)
        self.dashboard_url = dashboard_url

    def url(self) -> str:
        return self.settings.endpoint

    def payload(self, alert: Alert) -> object:
        raise NotImplementedError

    def bundle_payload(self, delivery: Delivery) -> object:
        raise NotImplementedError

    def deliver(self, alert: Alert) -> None:
        self._post(self.payload(alert), alert)

    def deliver_bundle(self, delivery: Delivery) -> None:
        self._post(self.bundle_payload(delivery), delivery.alert)

    def _post(self, document: object, alert: Alert) -> None:
        body = json.dumps(document, allow_nan=False).encode()
        url, credentials = _without_userinfo(self.url())
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT,
                   "Idempotency-Key": idempotency_key(self.name, alert), **credentials,
                   **{name: value.get_secret_value() for name, value in self.settings.headers}}
        request = urllib.request.Request(url, data=body, method="POST", headers=headers)
        shown = redact_url(self.url())
        try:
            with urllib.request.urlopen(request, timeout=self.settings.timeout_seconds) as response:
                response.read()
        except urllib.error.HTTPError as err:
            detail = err.read(500).decode(errors="replace").strip()
            retryable = err.code in RETRYABLE_HTTP or err.code >= 500
            raise SinkError(self.redact(f"{self.name}: {shown} answered HTTP {err.code} {detail}"), retryable) from None
        except (urllib.error.URLError, OSError) as err:  # refused, unreachable, timed out
            reason = getattr(err, "reason", err)
            raise SinkError(self.redact(f"{self.name}: cannot reach {shown}: {reason}")) from None
        except ValueError as err:  # a URL urllib cannot use (http.client.InvalidURL): retrying will not help
            raise SinkError(self.redact(f"{self.name}: cannot send to {shown}: {err}"), retryable=False) from None


def _without_userinfo(url: str) -> tuple[str, dict[str, str]]:
    """urllib sends no credentials from a URL (it takes user:password@ for part of the host name): they go as HTTP
    Basic authentication instead."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, {}
    user_password = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}".encode()
    return (parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl(),
            {"Authorization": f"Basic {base64.b64encode(user_password).decode()}"})


class WebhookSink(HttpSink):
    """The alert's fields as they are, plus an ISO time and a dashboard link."""

    def payload(self, alert: Alert) -> dict:
        fields = alert.model_dump()
        fields.update(value=_finite(alert.value), threshold=_finite(alert.threshold), source="trainwire",
                      time=_iso(alert_time(alert)), summary=describe(alert), link=run_link(self.dashboard_url, alert))
        if "/flapping@" in alert.dedup_key:
            fields["page"] = "flapping"
        return fields

    def bundle_payload(self, delivery: Delivery) -> dict:
        """The first incident's fields under the bundle's key, with a summary and every incident listed."""
        fields = self.payload(delivery.alert)
        summary = describe_bundle(delivery)
        fields.update(summary=summary, message=summary, page=delivery.kind or "bundle", count=len(delivery.members),
                      runs=runs_of(delivery.members), alerts=[self.payload(member) for member in delivery.members])
        return fields


class PagerDutySink(HttpSink):
    """Events API v2: a trigger when the incident fires, a resolve when it clears, both with its dedup key."""

    def payload(self, alert: Alert) -> dict:
        event = {"routing_key": self.settings.routing_key.get_secret_value(), "dedup_key": alert.dedup_key,
                 "event_action": "resolve" if alert.state == "resolved" else "trigger"}
        if alert.state == "resolved":
            return event
        link = run_link(self.dashboard_url, alert)
        event["payload"] = {
            "summary": describe(alert)[:1024], "source": alert.run_id, "severity": PAGERDUTY_SEVERITY[alert.severity],
            "timestamp": _iso(alert_time(alert)), "component": alert.experiment, "group": alert.team or "unassigned",
            "class": alert.rule, "custom_details": {
                "step": alert.step, "value": _finite(alert.value), "threshold": _finite(alert.threshold),
                "message": alert.message, "trainwire_severity": alert.severity},
        }
        event["client"] = "trainwire"
        if link:
            event["client_url"] = link
            event["links"] = [{"href": link, "text": f"run {alert.run_id} in trainwire"}]
        return event

    def bundle_payload(self, delivery: Delivery) -> dict:
        event = self.payload(delivery.alert)
        if delivery.alert.state == "resolved":
            return event
        members = delivery.members
        experiments = {a.experiment for a in members}
        worst = max((a.severity for a in members), key=SEVERITY_RANK.__getitem__)
        source = experiments.pop() if len(experiments) == 1 else "trainwire"
        event["payload"].update(
            summary=describe_bundle(delivery)[:1024], source=source,
            severity=PAGERDUTY_SEVERITY[worst], custom_details={
                "runs": runs_of(members), "count": len(members), "page": delivery.kind or "bundle",
                "incidents": [{"run_id": a.run_id, "rule": a.rule, "step": a.step, "value": _finite(a.value),
                               "message": a.message, "dedup_key": a.dedup_key} for a in members[:200]]})
        event.pop("links", None)
        event.pop("client_url", None)
        return event


class SlackSink(HttpSink):
    def payload(self, alert: Alert) -> dict:
        icon = ":white_check_mark:" if alert.state == "resolved" else SLACK_ICON[alert.severity]
        text = f"{icon} {describe(alert)}"
        details = [f"*value* {_finite(alert.value)}", f"*threshold* {_finite(alert.threshold)}",
                   f"*team* {alert.team or 'unassigned'}"]
        if link := run_link(self.dashboard_url, alert):
            details.append(f"<{link}|open the run>")
        return {"text": text, "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": text}},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": "  ·  ".join(details)}]},
        ]}

    def bundle_payload(self, delivery: Delivery) -> dict:
        resolved = delivery.alert.state == "resolved"
        icon = ":white_check_mark:" if resolved else SLACK_ICON[max(
            (a.severity for a in delivery.members), key=SEVERITY_RANK.__getitem__)]
        text = f"{icon} {describe_bundle(delivery)}"
        return {"text": text, "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": text[:3000]}},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": chunk}
                                             for chunk in _slack_chunks(runs_of(delivery.members))]},
        ]}


def _slack_chunks(runs: list[str], size: int = 2900, most: int = 10) -> list[str]:
    """The runs as Slack allows them: a context block holds at most 10 texts of at most 3,000 characters."""
    chunks, current = [], "runs:"
    for i, run in enumerate(runs):
        if len(current) + len(run) + 2 > size:
            if len(chunks) == most - 1:
                return [*chunks, f"{current} … and {len(runs) - i} more"]
            chunks.append(current)
            current = ""
        current = f"{current}, {run}" if current and current != "runs:" else f"{current} {run}".strip()
    return [*chunks, current]


class AlertmanagerSink(HttpSink):
    def url(self) -> str:
        return f"{self.settings.endpoint.rstrip('/')}/api/v2/alerts"

    def payload(self, alert: Alert) -> list[dict]:
        at = alert_time(alert)
        labels = {"alertname": alert.rule, "run_id": alert.run_id, "experiment": alert.experiment,
                  "severity": alert.severity, "team": alert.team or "unassigned", "dedup_key": alert.dedup_key,
                  "source": "trainwire"}
        annotations = {"summary": describe(alert), "description": alert.message,
                       "value": str(alert.value), "threshold": str(alert.threshold), "step": str(alert.step)}
        ends = at if alert.state == "resolved" else at + ALERTMANAGER_FIRING_FOR
        document = {"labels": labels, "annotations": annotations, "startsAt": _iso(at), "endsAt": _iso(ends)}
        if link := run_link(self.dashboard_url, alert):
            document["generatorURL"] = link
        return [document]

    def bundle_payload(self, delivery: Delivery) -> list[dict]:
        """Every incident as its own alert, in one request: Alertmanager groups them by its own rules."""
        state = delivery.alert.state
        return [self.payload(member.model_copy(update={"state": state}))[0] for member in delivery.members]


_KINDS = {"console": ConsoleSink, "webhook": WebhookSink, "pagerduty": PagerDutySink, "slack": SlackSink,
          "alertmanager": AlertmanagerSink}


def build_sinks(settings: AlertingSettings) -> list[RoutedSink]:
    sinks: list[RoutedSink] = []
    for sink in settings.sinks:
        cls = _KINDS[sink.kind]
        sinks.append(cls(sink) if cls is ConsoleSink else cls(sink, settings.dashboard_url))
    return sinks
