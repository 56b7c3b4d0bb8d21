"""Where alerts page (docs/alerting.md): `[[alerting.sinks]]` tables of the TRAINWIRE_CONFIG file, or
TRAINWIRE_ALERTING as JSON. With none configured, alerts are written to the console only.

Each sink names its kind, its endpoint and the alerts routed to it (severities, teams, states), and how many pages
a minute it may send. `[alerting]` also says how pages are kept few (holds, flapping, grouping, silences: docs/
alerting.md, "Pages people trust"). A typo — an unknown kind or key, a webhook without a URL, PagerDuty without a
routing key, a value out of its range — fails at start-up with its key.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from trainwire.schemas.events import AlertState, Severity

from .redact import url_secrets

SinkKind = Literal["console", "webhook", "pagerduty", "slack", "alertmanager"]
GroupLabel = Literal["experiment", "team", "host"]
PAGERDUTY_EVENTS_URL = "https://events.pagerduty.com/v2/enqueue"
_HTTP_URL = re.compile(r"^(https?://\S+)?$")


class SinkSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: SinkKind
    name: str = Field(default="", pattern=r"^[A-Za-z0-9_.-]*$",
                      description="unique per deployment (default: the kind); delivery is tracked by name")
    # Secrets (a webhook's URL often is one, as Slack's is): never printed, logged or stored (infra/redact.py).
    url: SecretStr = Field(default=SecretStr(""), description="webhook, Slack incoming webhook, Alertmanager base "
                           "URL; PagerDuty: the Events API v2 endpoint (default the public one)")
    routing_key: SecretStr = Field(default=SecretStr(""), description="PagerDuty integration (routing) key")
    headers: tuple[tuple[str, SecretStr], ...] = Field(default=(), description="extra HTTP headers, a table: "
                                                       "headers = { Authorization = \"Bearer …\" }")
    severities: tuple[Severity, ...] = Field(default=("info", "warning", "critical", "block"),
                                             description="alert severities routed to this sink")
    teams: tuple[str, ...] = Field(default=(), description="teams routed to this sink; empty: every team")
    states: tuple[AlertState, ...] = Field(default=("firing", "resolved"), description="firing, resolved or both")
    timeout_seconds: float = Field(default=5.0, gt=0, le=600, description="per HTTP request")
    rate_limit_per_minute: int = Field(default=30, ge=0, le=10_000, description="firing pages this sink sends in "
                                       "any 60 s at most; what it holds back goes out as one summary page once "
                                       "the minute allows (0: no limit)")

    @field_validator("headers", mode="before")
    @classmethod
    def _header_table(cls, value: object) -> object:
        return tuple(value.items()) if isinstance(value, dict) else value  # a tuple keeps the settings hashable

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: SecretStr) -> SecretStr:
        if not _HTTP_URL.match(value.get_secret_value()):  # the message leaves the URL out: it may be a secret
            raise ValueError("expected an http:// or https:// URL without spaces")
        return value

    @model_validator(mode="after")
    def _endpoint(self) -> SinkSettings:
        if self.kind in ("webhook", "slack", "alertmanager") and not self.url.get_secret_value():
            raise ValueError(f"a {self.kind} sink needs a url")
        if self.kind == "pagerduty" and not self.routing_key.get_secret_value():
            raise ValueError("a pagerduty sink needs a routing_key")
        return self

    @property
    def sink_name(self) -> str:
        return self.name or self.kind

    @property
    def endpoint(self) -> str:
        return self.url.get_secret_value() or (PAGERDUTY_EVENTS_URL if self.kind == "pagerduty" else "")

    def secrets(self) -> list[str]:
        """What must not appear in what this sink prints or stores: its URL's credentials, key and header values."""
        return [*url_secrets(self.endpoint), self.routing_key.get_secret_value(),
                *(value.get_secret_value() for _, value in self.headers)]


class AlertingSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    sinks: tuple[SinkSettings, ...] = Field(default=(SinkSettings(kind="console"),))
    retry_initial_seconds: float = Field(default=0.5, gt=0, le=3600, description="first back-off after a failed delivery")
    retry_max_seconds: float = Field(default=60.0, gt=0, le=24 * 3600, description="back-off doubles up to this")
    give_up_after_seconds: float = Field(default=24 * 3600.0, gt=0, le=30 * 24 * 3600, description="a page still undelivered this "
                                         "long after it arrived is marked failed (shown by `trainwire alerts "
                                         "status`)")
    dashboard_url: str = Field(default="", description="links in pages point here (e.g. http://ops:8501)")
    # Noise control (docs/alerting.md, "Pages people trust"): flapping, grouping, holds and silences.
    resolve_hold_seconds: float = Field(default=5.0, ge=0, le=3600, allow_inf_nan=False, description="a resolution "
                                        "is paged once its run and rule stayed clear this long; firing again "
                                        "within it continues the same page")
    flap_threshold: int = Field(default=3, ge=1, le=1000, description="a run and rule that fires more than this "
                                "many times within flap_window_seconds is flapping: one page, one resolution")
    flap_window_seconds: float = Field(default=1800.0, gt=0, le=7 * 24 * 3600, allow_inf_nan=False,
                                       description="the window flapping is counted in")
    flap_settle_seconds: float = Field(default=300.0, gt=0, le=24 * 3600, allow_inf_nan=False, description="a "
                                       "flapping incident resolves once its run and rule stayed clear this long")
    group_by: tuple[GroupLabel, ...] = Field(default=("experiment",), description="pages of one rule are grouped "
                                             "per these labels (experiment, team, host); empty: per rule")
    group_wait_seconds: float = Field(default=10.0, ge=0, le=3600, allow_inf_nan=False, description="the first "
                                      "page of a group goes at once; the group's further runs are batched into one "
                                      "page this often (0: no grouping)")
    silence_refresh_seconds: float = Field(default=5.0, ge=0.1, le=300, allow_inf_nan=False, description="how "
                                           "often the alert consumer reads the silences again")

    @model_validator(mode="after")
    def _unique_names(self) -> AlertingSettings:
        names = [sink.sink_name for sink in self.sinks]
        if duplicated := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"sink names must be unique; give each a name: {', '.join(duplicated)}")
        if len(set(self.group_by)) != len(self.group_by):
            raise ValueError(f"group_by names a label twice: {', '.join(self.group_by)}")
        return self
