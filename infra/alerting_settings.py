"""Where alerts page (docs/alerting.md): `[[alerting.sinks]]` tables of the TRAINWIRE_CONFIG file, or
TRAINWIRE_ALERTING as JSON. With none configured, alerts are written to the console only.

Each sink names its kind, its endpoint and the alerts routed to it (severities, teams, states). A typo — an unknown
kind or key, a webhook without a URL, PagerDuty without a routing key — fails at start-up with its key.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from trainwire.schemas.events import AlertState, Severity

SinkKind = Literal["console", "webhook", "pagerduty", "slack", "alertmanager"]
PAGERDUTY_EVENTS_URL = "https://events.pagerduty.com/v2/enqueue"


class SinkSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: SinkKind
    name: str = Field(default="", pattern=r"^[A-Za-z0-9_.-]*$",
                      description="unique per deployment (default: the kind); delivery is tracked by name")
    url: str = Field(default="", pattern=r"^(https?://\S+)?$", description="webhook, Slack incoming webhook, "
                     "Alertmanager base URL; PagerDuty: the Events API v2 endpoint (default the public one)")
    routing_key: str = Field(default="", description="PagerDuty integration (routing) key")
    headers: tuple[tuple[str, str], ...] = Field(default=(), description="extra HTTP headers, a table: "
                                                 "headers = { Authorization = \"Bearer …\" }")
    severities: tuple[Severity, ...] = Field(default=("info", "warning", "critical", "block"),
                                             description="alert severities routed to this sink")
    teams: tuple[str, ...] = Field(default=(), description="teams routed to this sink; empty: every team")
    states: tuple[AlertState, ...] = Field(default=("firing", "resolved"), description="firing, resolved or both")
    timeout_seconds: float = Field(default=5.0, gt=0, le=600, description="per HTTP request")

    @field_validator("headers", mode="before")
    @classmethod
    def _header_table(cls, value: object) -> object:
        return tuple(value.items()) if isinstance(value, dict) else value  # a tuple keeps the settings hashable

    @model_validator(mode="after")
    def _endpoint(self) -> SinkSettings:
        if self.kind in ("webhook", "slack", "alertmanager") and not self.url:
            raise ValueError(f"a {self.kind} sink needs a url")
        if self.kind == "pagerduty" and not self.routing_key:
            raise ValueError("a pagerduty sink needs a routing_key")
        return self

    @property
    def sink_name(self) -> str:
        return self.name or self.kind

    @property
    def endpoint(self) -> str:
        return self.url or (PAGERDUTY_EVENTS_URL if self.kind == "pagerduty" else "")


class AlertingSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    sinks: tuple[SinkSettings, ...] = Field(default=(SinkSettings(kind="console"),))
    retry_initial_seconds: float = Field(default=0.5, gt=0, le=3600, description="first back-off after a failed delivery")
    retry_max_seconds: float = Field(default=60.0, gt=0, le=24 * 3600, description="back-off doubles up to this")
    give_up_after_seconds: float = Field(default=24 * 3600.0, gt=0, le=30 * 24 * 3600, description="a page still undelivered this "
                                         "long after it arrived is marked failed (shown by `trainwire alerts "
                                         "status`)")
    dashboard_url: str = Field(default="", description="links in pages point here (e.g. http://ops:8501)")

    @model_validator(mode="after")
    def _unique_names(self) -> AlertingSettings:
        names = [sink.sink_name for sink in self.sinks]
        if duplicated := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"sink names must be unique; give each a name: {', '.join(duplicated)}")
        return self
