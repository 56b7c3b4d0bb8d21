"""Where the audit log's key, anchor and lock live for a store, set once per process by `configure_audit`.

`append_entry(client, …)` finds its configuration from the client: the one an entry point configured for that
store, else (chdb) the home that holds the data directory, `<home>/chdb`, or (a server) the settings in the
environment. A test's own chdb in `tmp_path` therefore keys, anchors and locks inside `tmp_path`, never in a
user's home.
"""

from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from clickhouse_connect.driver.client import Client
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from trainwire.infra.config import ConfigError, Settings, load_settings

from .audit_lock import append_lock
from .audit_signing import Signer, TrustedKeys, ensure_home_key, load_public_key, signer_for

ANCHOR_NAME = "audit-anchor.log"
LOCK_NAME = "audit.lock"


@dataclass(frozen=True)
class AuditConfig:
    home: Path
    key: Path | None = None  # None: the home's own key, made on first use
    public_keys: tuple[Path, ...] = ()
    anchor: Path | None = None
    settings: Settings | None = field(default=None, compare=False)  # for the Kafka head topic, when configured

    @classmethod
    def from_settings(cls, settings: Settings) -> "AuditConfig":
        return cls(settings.home, settings.audit_key, tuple(settings.audit_public_keys), settings.audit_anchor,
                   settings)

    @property
    def anchor_path(self) -> Path:
        return self.anchor or self.home / ANCHOR_NAME

    @property
    def lock_path(self) -> Path:
        return self.home / LOCK_NAME

    def signer(self) -> Signer:
        if self.key is None:
            return signer_for(ensure_home_key(self.home))
        if not self.key.is_file():
            raise ConfigError(f"TRAINWIRE_AUDIT_KEY: no such file {str(self.key)!r}")
        try:
            return signer_for(self.key)
        except (OSError, ValueError) as err:
            raise ConfigError(f"TRAINWIRE_AUDIT_KEY: {self.key}: {err}") from None

    def trusted_keys(self) -> TrustedKeys:
        """The listed public keys and this home's own signing key's."""
        trusted = TrustedKeys([self.signer().public_key])
        for key in self._listed_keys():
            trusted.add(key)
        return trusted

    def _listed_keys(self) -> list[Ed25519PublicKey]:
        keys = []
        for path in self.public_keys:
            try:
                keys.append(load_public_key(path.read_bytes()))
            except (OSError, ValueError) as err:
                raise ConfigError(f"TRAINWIRE_AUDIT_PUBLIC_KEYS: {path}: {err}") from None
        return keys

    def check(self) -> None:
        """Fail at start, naming the setting, on a configured key that is missing or unreadable (the home's own
        key is made on first use, not here)."""
        if self.key is not None:
            self.signer()
        self._listed_keys()


_lock = threading.Lock()
_by_chdb_path: dict[str, AuditConfig] = {}
_for_servers: AuditConfig | None = None


def chdb_path(client: Client) -> str | None:
    """The data directory of an embedded (chdb) client; None for a ClickHouse server."""
    path = getattr(client, "path", None) if type(client).__name__ == "ChdbClient" else None
    return os.path.realpath(path) if path and path != ":memory:" else None


def _dsn_chdb_path(dsn: str) -> str | None:
    return os.path.realpath(dsn.removeprefix("chdb://")) if dsn.startswith("chdb://") else None


def configure_audit(settings: Settings) -> AuditConfig:
    """Record the audit settings for the store these settings name; called by every entry point."""
    global _for_servers
    config = AuditConfig.from_settings(settings)
    config.check()
    append_lock.home_file = config.lock_path
    with _lock:
        if path := _dsn_chdb_path(settings.store_dsn):
            _by_chdb_path[path] = config
        else:
            _for_servers = config
    return config


def config_for(client: Client) -> AuditConfig:
    global _for_servers
    path = chdb_path(client)
    with _lock:
        configured = _by_chdb_path.get(path) if path else _for_servers
    if configured is not None:
        return configured
    if path is None and type(client).__name__ == "ChdbClient":
        raise ValueError("the audit log needs a chdb data directory (an in-memory store has no home for its key)")
    settings = load_settings()  # unconfigured: what the environment says, remembered like a configuration
    if path is None or _dsn_chdb_path(settings.store_dsn) == path:
        configured = AuditConfig.from_settings(settings)
    else:
        configured = AuditConfig(Path(path).parent)
    with _lock:
        if path:
            configured = _by_chdb_path.setdefault(path, configured)
        else:
            configured = _for_servers = _for_servers or configured
    return configured


_identities: "weakref.WeakKeyDictionary[Client, str]" = weakref.WeakKeyDictionary()


def store_identity(client: Client) -> str:
    """What names this store in the anchor: the chdb data directory, or the server's UUID and database (the
    same from every host, and not changeable through SQL)."""
    if path := chdb_path(client):
        return f"chdb:{path}"
    try:
        return _identities[client]
    except (KeyError, TypeError):
        pass
    server, database = client.query("SELECT toString(serverUUID()), currentDatabase()").result_rows[0]
    identity = f"clickhouse:{server}/{database}"
    try:
        _identities[client] = identity
    except TypeError:
        pass
    return identity
