"""What every view shares: the read API, the chosen run and time range, live refresh, state kept across pages."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import streamlit as st
from clickhouse_connect.driver.client import Client

from trainwire.infra.config import Settings, load_settings
from trainwire.infra.store import connect_store
from trainwire.infra.store.read import Row, StoreReader

# Training refreshes often enough that a step shows within ~2 s of `log_step` (ingest batches ≤ 0.5 s); the
# other views show minutes-scale state and refresh less often.
LIVE_SECONDS = 0.5
REFRESH_SECONDS = 2.0
# The time range control's choices as they appear in URLs (`?range=1h`), how far back each goes, what it shows.
RANGES: dict[str, timedelta | None] = {
    "15m": timedelta(minutes=15), "1h": timedelta(hours=1), "24h": timedelta(hours=24), "7d": timedelta(days=7),
    "all": None, "custom": None,
}
RANGE_LABELS = {"15m": "15 min", "1h": "1 h", "24h": "24 h", "7d": "7 d", "all": "all", "custom": "custom"}
DEFAULT_RANGE = "all"
NO_RUNS = "No runs yet. Start one with `trainwire demo` or `trainwire.init()`; this page updates on its own."


_served: list[Settings] = []  # what `trainwire dashboard`, `up` or `demo` serves this process's app with


def serve_with(served: Settings) -> None:
    _served[:] = [served]


def settings() -> Settings:
    """The settings the dashboard was started with, flags included; else (AppTest) the environment's."""
    return _served[0] if _served else load_settings()


@st.cache_resource(show_spinner=False, on_release=lambda client: client.close())
def store_client(dsn: str) -> Client:
    return connect_store(dsn)


def client() -> Client:
    return store_client(settings().store_dsn)


def reader() -> StoreReader:
    return StoreReader(client())


# --- State kept across reruns and pages ------------------------------------------------------------------------

def kept(key: str, default: Any, valid: Callable[[Any], Any] | None = None, *, resend: bool = False) -> str:
    """`key` for a widget whose value outlives pages that do not show it: Streamlit drops a widget's state when
    a page without it runs, so the value is shadowed in plain session state and restored from there. `valid`
    maps a kept value to one the widget still offers (a run no longer listed, a filter value gone).

    `resend`: write the value even when unchanged, so that every run sends it to the browser with the widget. For
    the selections every view acts on (the run, the time range): a page switch that interrupts the first run can
    otherwise leave the browser showing the widget's default (another run in the picker) while the page acts on
    the kept value, and the next click sends the default back. Not for text boxes: a rerun while someone types
    would put the old text back."""
    shadow = f"kept.{key}"
    value = st.session_state[key] if key in st.session_state else st.session_state.get(shadow, default)
    value = valid(value) if valid else value
    if resend or key not in st.session_state or st.session_state[key] != value:
        st.session_state[key] = value
    st.session_state[shadow] = value
    return key


def from_url(key: str) -> None:
    """A bookmarked or shared URL's `?key=` seeds the selection once, when this session has none yet."""
    if key in st.query_params and f"kept.{key}" not in st.session_state:
        st.session_state[f"kept.{key}"] = st.query_params[key]


def to_url(**values: str | None) -> None:
    for key, value in values.items():
        if value:
            st.query_params[key] = value
        else:
            st.query_params.pop(key, None)


# --- The run and time range every view works on -------------------------------------------------------------------

def run_label(run: Row) -> str:
    return f"{run['run_name']} · {run['status']} · {run['run_id'][:8]}"


def runs_listing() -> list[Row]:
    """The runs the sidebar offers, as read at the start of this script run (newest first)."""
    return st.session_state.get("runs_listing", [])


def labels() -> dict[str, str]:
    return {run["run_id"]: run_label(run) for run in runs_listing()}


def selected_run() -> str | None:
    return st.session_state.get("run")


@dataclass(frozen=True)
class TimeRange:
    label: str
    since: datetime | None
    until: datetime | None

    @property
    def live(self) -> bool:
        """Relative ranges end now, so they follow new data; a custom range is history."""
        return self.label != "custom"

    def describe(self) -> str:
        if self.label == "all":
            return "all time"
        if self.live:
            return f"last {RANGE_LABELS[self.label]}"
        return f"{self.since:%Y-%m-%d %H:%M} – {self.until:%Y-%m-%d %H:%M} UTC"


def time_range() -> TimeRange:
    """The sidebar's time range, resolved now: "last 1 h" moves with every refresh."""
    label = st.session_state.get("range") or DEFAULT_RANGE
    if label == "custom":
        since, until = st.session_state.get("range_from"), st.session_state.get("range_to")
        if since is not None and until is not None:
            return TimeRange(label, _aware(since), _aware(until))
        label = DEFAULT_RANGE
    span = RANGES[label]
    return TimeRange(label, datetime.now(timezone.utc) - span if span else None, None)


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def live(body: Callable[[], None], every: float = LIVE_SECONDS) -> None:
    """Run `body` as a fragment that reruns on its own every `every` seconds while the range is live (history
    does not change), without reloading the page or touching the sidebar's selections."""
    st.fragment(body, run_every=every if time_range().live else None)()


def require_runs() -> bool:
    """Whether the store holds runs, after saying it holds none yet."""
    if not runs_listing():
        st.info(NO_RUNS)
        return False
    return True


def require_run() -> str | None:
    """The chosen run, or None after saying there is none yet."""
    run_id = selected_run()
    if run_id is None:
        st.info(NO_RUNS)
    return run_id


# --- Formatting ----------------------------------------------------------------------------------------------------

def ago(when: datetime | None, now: datetime | None = None) -> str:
    if when is None:
        return "never"
    seconds = ((now or datetime.now(timezone.utc)) - _aware(when)).total_seconds()
    return f"{duration(max(0.0, seconds))} ago"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"
