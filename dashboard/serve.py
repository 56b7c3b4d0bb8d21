"""Serve the Streamlit app in this process (so an embedded chdb store is shared with ingest)."""

from __future__ import annotations

import ipaddress
import os
import sys
import tomllib
from pathlib import Path

from trainwire.consumers.governance import roles_for
from trainwire.infra.config import ConfigError, Settings

from .shared import serve_with

APP = Path(__file__).with_name("app.py")


def secrets_files(settings: Settings) -> list[str]:
    """Where Streamlit looks for its secrets (`[auth]` for dashboard_auth=oidc): its own two places, then the
    trainwire home's, which wins where they overlap."""
    return [str(Path("~/.streamlit/secrets.toml").expanduser()), str(Path.cwd() / ".streamlit" / "secrets.toml"),
            str(settings.home / "dashboard-secrets.toml")]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def dashboard_url(settings: Settings, port: int) -> str:
    """The one address to open: loopback and every-interface addresses (0.0.0.0, ::) as localhost."""
    host = settings.dashboard_host
    local = host in ("127.0.0.1", "localhost") or host.strip("[]") in ("0.0.0.0", "::")
    shown = "localhost" if local else (f"[{host}]" if ":" in host and "[" not in host else host)
    return f"http://{shown}:{port}"


def exposure_warning(settings: Settings) -> str | None:
    if settings.dashboard_auth != "none" or is_loopback(settings.dashboard_host):
        return None
    return (f"warning: the dashboard listens on {settings.dashboard_host} without authentication: anyone who can "
            "reach it sees every run (set TRAINWIRE_DASHBOARD_AUTH=oidc or proxy, docs/security.md)")


def check_oidc_secrets(settings: Settings) -> None:
    """dashboard_auth=oidc needs Streamlit's `[auth]`: refuse to start without it, rather than serve a login
    button that fails."""
    auth: dict = {}
    for path in filter(Path.is_file, map(Path, secrets_files(settings))):
        try:
            auth |= tomllib.loads(path.read_text()).get("auth") or {}
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ConfigError(f"TRAINWIRE_DASHBOARD_AUTH=oidc: cannot read {path}: {err}") from None
    missing = [key for key in ("redirect_uri", "cookie_secret") if not auth.get(key)]
    if missing:
        raise ConfigError(f"TRAINWIRE_DASHBOARD_AUTH=oidc: no {', '.join(missing)} in an [auth] section of "
                          f"Streamlit's secrets ({secrets_files(settings)[-1]}; docs/security.md)")


def serve_dashboard(settings: Settings, port: int = 8501) -> None:
    """Blocks until Ctrl-C. The app, run in this process, reads these same settings (shared.settings()). Says the
    one URL to open; Streamlit's own banner is off (its Network URL and a failed external-IP lookup, made over
    the internet, only confuse)."""
    from streamlit.web import bootstrap

    if settings.dashboard_auth == "oidc":
        check_oidc_secrets(settings)
    roles_for(settings)  # a bad roles file stops the start, not each page
    if warning := exposure_warning(settings):
        print(warning, file=sys.stderr, flush=True)
    serve_with(settings)
    # uvicorn would otherwise take the client's address from X-Forwarded-For when the peer is loopback, so a local
    # client could pose as a trusted proxy, and a proxy on loopback would never be recognised as one.
    os.environ["FORWARDED_ALLOW_IPS"] = ""
    flags = {
        "server.address": settings.dashboard_host, "server.port": port, "server.headless": True,
        "server.fileWatcherType": "none", "browser.gatherUsageStats": False, "server.runOnSave": False,
        "global.developmentMode": False, "client.toolbarMode": "viewer", "server.enableAgentApi": False,
        "secrets.files": secrets_files(settings), "logger.hideWelcomeMessage": True,
        "logger.level": "warning",
    }
    bootstrap.load_config_options(flag_options=flags)
    print(f"dashboard on {dashboard_url(settings, port)} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    bootstrap.run(str(APP), False, [], flags)
