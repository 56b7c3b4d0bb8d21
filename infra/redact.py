"""Credentials out of everything trainwire prints, logs or stores: URLs, DSNs, headers and error messages.

A URL keeps what a person needs to tell endpoints apart (scheme, host, port, the first path segment) and loses what
would let someone else use it: a userinfo password, the values of secret-looking query keys, and the path after its
first segment (where Slack, Discord, Teams, Zapier and most webhook services put the secret).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from urllib.parse import quote, quote_plus, urlsplit

MASK = "***"
# Query keys and header names whose values are credentials: token, api_key, routing_key, secret, password, sig…
_SECRET_NAME = re.compile(r"token|key|secret|pass|pwd|sig|auth|cred|session|cookie", re.IGNORECASE)
# A path segment that reads as a credential rather than a word: long, letters and digits mixed.
_SECRET_SEGMENT = re.compile(r"^(?=.*\d)(?=.*[A-Za-z])[A-Za-z0-9_\-.~%]{16,}$")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>()\[\]{}]*[^\s'\"<>()\[\]{}:,.;!?]")
_WEB_SCHEMES = frozenset({"http", "https", "ws", "wss"})
_LONG_SEGMENT = 10  # a path segment this long after the first is taken for a credential even if it reads as a word
_SHORTEST_SECRET = 3  # shorter "secrets" protect nothing, and masking them would garble every message


def redact_url(url: str) -> str:
    """The URL with its credentials masked; a string that does not parse as a URL is masked whole."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        port = parts.port
    except ValueError:
        return MASK
    if not parts.scheme:
        return MASK if parts.password or "@" in url else url
    netloc = parts.netloc
    if "@" in netloc:
        user = f"{parts.username}:{MASK}" if parts.password is not None else MASK
        where = f"[{host}]" if host and ":" in host else (host or "")
        netloc = f"{user}@{where}" + (f":{port}" if port is not None else "")
    path = _redact_path(parts.path) if parts.scheme.lower() in _WEB_SCHEMES else parts.path
    query, fragment = _redact_query(parts.query), MASK if parts.fragment else ""
    # by hand: urlunsplit would turn chdb:///abs/path into chdb:/abs/path
    return (f"{parts.scheme}://{netloc}{path}" + (f"?{query}" if parts.query else "")
            + (f"#{fragment}" if fragment else ""))


def _redact_path(path: str) -> str:
    segments = path.split("/")  # "/services/T0/B0/X" → ["", "services", "T0", "B0", "X"]
    if len(segments) < 2 or not segments[1]:
        return path
    first = MASK if _SECRET_SEGMENT.match(segments[1]) else segments[1]
    rest = any(segments[2:])
    return f"/{first}" + (f"/{MASK}" if rest else "/" * (len(segments) > 2))


def _redact_query(query: str) -> str:
    if not query:
        return ""
    pairs = []
    for pair in query.split("&"):
        name, sep, value = pair.partition("=")
        pairs.append(f"{name}{sep}{MASK}" if sep and value and _SECRET_NAME.search(name) else pair)
    return "&".join(pairs)


def is_secret_header(name: str) -> bool:
    """Authorization, Proxy-Authorization, Cookie, X-Api-Key, X-Auth-Token, X-Hub-Signature…"""
    return bool(_SECRET_NAME.search(name))


def redact_headers(headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> dict[str, str]:
    items = headers.items() if isinstance(headers, Mapping) else headers
    return {name: MASK if is_secret_header(name) else value for name, value in items}


def url_secrets(url: str) -> list[str]:
    """The parts of a URL that `redact_url` masks, to find them again in text that quotes them in pieces."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return [url]
    found = [parts.password or "", parts.username or "" if parts.password is None else ""]
    if parts.scheme.lower() in _WEB_SCHEMES:
        segments = [s for s in parts.path.split("/") if s]
        found.append("/".join(segments[1:]))  # a receiver's error may quote the path without the rest of the URL
        found += [s for i, s in enumerate(segments) if _SECRET_SEGMENT.match(s) or (i and len(s) >= _LONG_SEGMENT)]
    found += [value for name, _, value in (p.partition("=") for p in parts.query.split("&"))
              if value and _SECRET_NAME.search(name)]
    return [s for s in found if s]


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` (an error message, a response body) with every known secret and every URL's credentials masked."""
    known = {s for s in secrets if s and len(s) >= _SHORTEST_SECRET}
    variants = {v for s in known for v in (s, quote(s, safe=""), quote_plus(s))}
    for secret in sorted(variants, key=len, reverse=True):  # a secret inside a longer one goes with it
        text = text.replace(secret, MASK)
    return _URL.sub(lambda match: redact_url(match[0]), text)
