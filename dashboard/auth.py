"""Who is looking (docs/security.md, "Dashboard"): the user the configured authentication names, or why not.

- `none`: nobody is asked; the viewer is `anonymous@<address>`. For the loopback address it listens on by default.
- `oidc`: Streamlit's login (`st.login`, an `[auth]` section in its secrets); the viewer is the IdP's email (else
  its subject).
- `proxy`: an authenticating reverse proxy names the user in a header, believed only from a configured proxy
  address or with the proxy's shared secret; any other request is refused.
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass

import streamlit as st

from trainwire.consumers.governance.registry import normalise_actor
from trainwire.infra.config import Settings

SECRET_HEADER = "X-Trainwire-Proxy-Secret"
# Streamlit hides a loopback peer's address (st.context.ip_address is then None).
LOOPBACK = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))


@dataclass(frozen=True)
class Viewer:
    name: str  # the actor in the audit log and the roles file
    method: str  # none | oidc | proxy


@dataclass(frozen=True)
class Refusal:
    actor: str  # who to log the refusal under: the address, never a name the request merely claims
    reason: str
    claimed: str = ""
    login: bool = False  # not refused yet: the OIDC login is offered
    headline: str = "Not authenticated"


def authenticate(settings: Settings) -> Viewer | Refusal:
    if settings.dashboard_auth == "oidc":
        return _from_login()
    if settings.dashboard_auth == "proxy":
        return _from_proxy(settings)
    return Viewer(_anonymous(), "none")


def _anonymous() -> str:
    address = st.context.ip_address
    return f"anonymous@{address}" if isinstance(address, str) and address else "anonymous"


def _from_login() -> Viewer | Refusal:
    if not st.user.get("is_logged_in"):  # absent where no login ever happened
        return Refusal(_anonymous(), "not logged in", login=True)
    claimed = str(st.user.get("email") or st.user.get("sub") or "")
    return _named(claimed, "oidc", "the identity provider named no user (neither email nor sub)")


def _from_proxy(settings: Settings) -> Viewer | Refusal:
    headers = st.context.headers or {}
    claimed = headers.get(settings.dashboard_proxy_user_header) or ""
    if not (_from_trusted_proxy(settings) or _carries_secret(headers.get(SECRET_HEADER), settings)):
        return Refusal(_anonymous(), "neither from a trusted proxy address nor with the proxy's secret", claimed)
    return _named(claimed, "proxy", f"the proxy named no user in {settings.dashboard_proxy_user_header}")


def _named(claimed: str, method: str, missing: str) -> Viewer | Refusal:
    if not claimed.strip():
        return Refusal(_anonymous(), missing)
    try:
        return Viewer(normalise_actor(claimed), method)
    except ValueError as err:
        return Refusal(_anonymous(), str(err), claimed)


def _from_trusted_proxy(settings: Settings) -> bool:
    address = st.context.ip_address
    try:
        peers = (ipaddress.ip_address(address),) if address else LOOPBACK
    except ValueError:
        return False
    return any(peer in network for peer in peers for network in settings.dashboard_trusted_proxies
               if peer.version == network.version)


def _carries_secret(sent: str | None, settings: Settings) -> bool:
    secret = settings.dashboard_proxy_secret
    if secret is None or not sent:
        return False
    return hmac.compare_digest(sent.encode(), secret.get_secret_value().encode())
