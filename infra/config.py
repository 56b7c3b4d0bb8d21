"""One settings object, read from `TRAINWIRE_*` environment variables, built at each entry point and passed down."""

from __future__ import annotations

import difflib
import json
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, IPvAnyNetwork, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError, TomlConfigSettingsSource

from trainwire.schemas.events import Severity

from .alerting_settings import AlertingSettings
from .detector_settings import DetectorSettings
from .kafka_settings import check_bootstrap, check_pass_through, flatten_kafka_table, table_key
from .redact import redact_url

ENV_PREFIX = "TRAINWIRE_"


# Read by scripts and tests, not by Settings; any other TRAINWIRE_* name is a typo worth stopping for.
OTHER_VARIABLES = frozenset({"TRAINWIRE_CONFIG", "TRAINWIRE_KAFKA_CACHE", "TRAINWIRE_KAFKA_PORT", "TRAINWIRE_TEST_KAFKA",
                             "TRAINWIRE_CHROMIUM", "TRAINWIRE_TEST_LLAMAFACTORY_PYTHON",
                             "TRAINWIRE_TRACEBACK"})
CONFIG_FILE_VARIABLE = "TRAINWIRE_CONFIG"  # a TOML file with the same keys, lower case: kafka = "host:9092"


class ConfigError(ValueError):
    """A setting is invalid; the message names the environment variable."""


class _ConfigFileSource(TomlConfigSettingsSource):
    """The TRAINWIRE_CONFIG file, its `[kafka]` table read as the flat kafka_* keys."""

    def _read_file(self, file_path):
        return flatten_kafka_table(super()._read_file(file_path))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    home: Path = Field(default=Path("~/.trainwire"), description="holds the local log and the embedded store")
    kafka: str | None = Field(default=None, description="Kafka bootstrap servers; unset means the local log")
    # The Kafka clients' security and the topics trainwire creates (docs/kafka.md). Each check reads the fields
    # before it, so the order matters.
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None = Field(
        default=None, validate_default=True)
    kafka_sasl_username: str | None = Field(default=None, validate_default=True)
    kafka_sasl_password: SecretStr | None = Field(default=None, validate_default=True)
    kafka_ssl_ca_location: Path | None = Field(default=None, description="CA file (PEM) the brokers' certificates "
                                               "are checked against; unset: the system's")
    kafka_ssl_certificate_location: Path | None = Field(default=None, description="client certificate (mTLS)")
    kafka_ssl_key_location: Path | None = Field(default=None, validate_default=True,
                                                description="client private key (mTLS)")
    kafka_ssl_key_password: SecretStr | None = None
    kafka_client: dict[str, str | int | float | bool | SecretStr] = Field(
        default_factory=dict, description="other librdkafka properties for every client ([kafka.client] table)")
    kafka_partitions: int = Field(default=8, ge=1, le=10_000, description="partitions of the topics trainwire makes")
    kafka_replication_factor: int | None = Field(default=None, ge=1, le=32, description="unset: min(3, brokers)")
    kafka_min_insync_replicas: int | None = Field(default=None, ge=1, le=32, validate_default=True,
                                                  description="unset: min(2, replication factor)")
    kafka_retention_hours: float = Field(default=168.0, gt=0, le=87_600, allow_inf_nan=False,
                                         description="how long the topics trainwire makes keep records")
    store: str | None = Field(default=None, description="clickhouse-connect DSN; unset means chdb under home")
    store_cluster: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$",
                                      description="ClickHouse cluster name: tables become replicated and "
                                      "distributed, DDL runs ON CLUSTER (docs/storage.md)")
    schema_registry: str | None = Field(default=None, description="Confluent Schema Registry URL; unset means "
                                        "Avro single-object encoding")
    topic_prefix: str = Field(default="trainwire.", pattern=r"^[A-Za-z0-9._-]*$")
    team: str = ""
    metrics_host: str = Field(default="127.0.0.1", pattern=r"^[A-Za-z0-9_.:\-\[\]]+$", description="address the "
                              "Prometheus /metrics endpoint listens on (--metrics-host); anything but loopback warns")
    # Every count and interval is bounded: an infinite or huge interval kills the thread that waits on it
    # (OverflowError), and a typo of a few zeros should be refused at start, not found in production.
    batch_max_rows: int = Field(default=20_000, gt=0, le=1_000_000)
    batch_max_seconds: float = Field(default=0.5, gt=0, le=60, allow_inf_nan=False)
    ingest_path: Literal["columnar", "records"] = Field(default="columnar", description="how ingest decodes: "
                                                        "ClickHouse parses a batch into columns, or the old "
                                                        "per-record path (kept as a reference for benchmarks)")
    queue_size: int = Field(default=100_000, gt=0, le=10_000_000, description="events a producer buffers in memory")
    gpu_sample_seconds: float = Field(default=5.0, ge=0.1, le=3600, allow_inf_nan=False)
    heartbeat_seconds: float = Field(default=5.0, ge=0.1, le=3600, allow_inf_nan=False)
    flush_timeout_seconds: float = Field(default=10.0, ge=0, le=3600, allow_inf_nan=False)
    accept_days_back: float = Field(default=30.0, gt=0, le=3650, description="ingest dead-letters events dated "
                                    "further back than this (ClickHouse partitions by day; TTLs drop old rows)")
    accept_days_ahead: float = Field(default=1.0, gt=0, le=3650, description="…or further ahead (a clock gone wrong)")
    dead_letter_max_consecutive: int = Field(default=1_000, ge=1, description="ingest stops, committing nothing "
                                             "more, after this many records in a row went to the dead letters")
    dead_letter_max_ratio: float = Field(default=0.5, gt=0, le=1, description="…or when more than this share of "
                                         "its last 10,000 records (at least 1,000 seen) did")
    metrics_retention_days: int = Field(default=90, ge=30, le=90, description="per-step metrics and evals")
    gpu_retention_days: int = Field(default=30, ge=1, le=365, description="GPU samples and heartbeats")
    roles: Path | None = Field(default=None, description="TOML file of registry roles; unset: $home/roles.toml "
                               "if present, else every actor holds every role")
    # The dashboard (docs/security.md, "Dashboard"). dashboard_auth comes last: its check reads the others.
    dashboard_host: str = Field(default="127.0.0.1", pattern=r"^[A-Za-z0-9_.:\-\[\]]+$", description="address "
                                "the dashboard listens on; anything but loopback without dashboard_auth warns")
    dashboard_trusted_proxies: Annotated[tuple[IPvAnyNetwork, ...], NoDecode] = Field(
        default=(), description="proxy addresses or networks whose user header is believed (comma-separated)")
    dashboard_proxy_secret: SecretStr | None = Field(default=None, min_length=16, description="a request carrying "
                                                     "it in X-Trainwire-Proxy-Secret comes from the proxy")
    dashboard_proxy_user_header: str = Field(default="X-Forwarded-User", pattern=r"^[A-Za-z0-9-]+$",
                                             description="the header in which the proxy names the user")
    dashboard_auth: Literal["none", "oidc", "proxy"] = Field(default="none", description="none (loopback use), "
                                                             "oidc (st.login) or proxy (a trusted proxy's header)")
    audit_key: Path | None = Field(default=None, description="Ed25519 private key (PEM) that signs audit entries; "
                                   "unset: $home/audit-key.pem, made on first use")
    audit_public_keys: tuple[Path, ...] = Field(default=(), description="public keys (PEM) whose audit signatures "
                                                 "verify accepts, beside this home's own; env: a JSON list")
    audit_anchor: Path | None = Field(default=None, description="append-only file of signed audit log heads; "
                                      "unset: $home/audit-anchor.log")
    stop_switch_severities: tuple[Severity, ...] = Field(default=("block",), description="alert severities on "
                                                         "which the stop switch stops an opted-in run")
    detectors: DetectorSettings = Field(default_factory=DetectorSettings, description="rule thresholds: "
                                        "[detectors.<rule>] and [detectors.experiments.\"<name>\".<rule>]")
    alerting: AlertingSettings = Field(default_factory=AlertingSettings, description="where alerts page: "
                                       "[[alerting.sinks]] (docs/alerting.md)")

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        """Explicit values (CLI flags) win, then TRAINWIRE_* variables, then the TRAINWIRE_CONFIG file."""
        sources = [init_settings, env_settings]
        if path := os.environ.get(CONFIG_FILE_VARIABLE):
            sources.append(_ConfigFileSource(settings_cls, toml_file=path))
        return tuple(sources)

    @field_validator("home")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_validator("audit_key", "audit_anchor")
    @classmethod
    def _expand_path(cls, value: Path | None) -> Path | None:
        return value.expanduser().resolve() if value else None

    @field_validator("audit_public_keys")
    @classmethod
    def _expand_paths(cls, value: tuple[Path, ...]) -> tuple[Path, ...]:
        return tuple(path.expanduser().resolve() for path in value)

    @field_validator("kafka")
    @classmethod
    def _bootstrap(cls, value: str | None) -> str | None:
        return None if value in (None, "") else check_bootstrap(value)

    @field_validator("kafka_security_protocol", mode="before")
    @classmethod
    def _protocol_upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value  # librdkafka takes either case

    @field_validator("kafka_sasl_mechanism")
    @classmethod
    def _mechanism_for_sasl(cls, value: str | None, info: ValidationInfo) -> str | None:
        protocol = info.data.get("kafka_security_protocol", "PLAINTEXT")
        if protocol.startswith("SASL_") and value is None:
            raise ValueError(f"security protocol {protocol} needs a SASL mechanism: PLAIN, SCRAM-SHA-256, "
                             "SCRAM-SHA-512 or OAUTHBEARER")
        if value is not None and not protocol.startswith("SASL_"):
            raise ValueError(f"{value} is set but TRAINWIRE_KAFKA_SECURITY_PROTOCOL is {protocol}: set it to "
                             "SASL_SSL (or SASL_PLAINTEXT)")
        return value

    @field_validator("kafka_sasl_username", "kafka_sasl_password")
    @classmethod
    def _credentials_for_mechanism(cls, value: object, info: ValidationInfo) -> object:
        mechanism = info.data.get("kafka_sasl_mechanism")
        if value in (None, "") and mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
            raise ValueError(f"SASL {mechanism} needs a {info.field_name.rsplit('_', 1)[1]}")
        return value or None

    @field_validator("kafka_ssl_ca_location", "kafka_ssl_certificate_location", "kafka_ssl_key_location")
    @classmethod
    def _tls_file(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        protocol = info.data.get("kafka_security_protocol", "PLAINTEXT")
        if info.field_name == "kafka_ssl_key_location" and bool(value) != bool(
                info.data.get("kafka_ssl_certificate_location")):
            raise ValueError("a client certificate and its key go together: set both "
                             "TRAINWIRE_KAFKA_SSL_CERTIFICATE_LOCATION and TRAINWIRE_KAFKA_SSL_KEY_LOCATION")
        if value is None:
            return None
        if protocol not in ("SSL", "SASL_SSL"):
            raise ValueError(f"is set but TRAINWIRE_KAFKA_SECURITY_PROTOCOL is {protocol}, which uses no TLS")
        value = value.expanduser()
        if not value.is_file():
            raise ValueError(f"no such file {str(value)!r}")
        return value

    @field_validator("kafka_client", mode="before")
    @classmethod
    def _client_table(cls, value: object) -> object:
        if not isinstance(value, dict):
            raise ValueError("expected a table of librdkafka properties (a JSON object in TRAINWIRE_KAFKA_CLIENT)")
        return value

    @field_validator("kafka_client")
    @classmethod
    def _pass_through(cls, value: dict) -> dict:
        return check_pass_through(value)

    @field_validator("kafka_min_insync_replicas")
    @classmethod
    def _insync_within_replicas(cls, value: int | None, info: ValidationInfo) -> int | None:
        replicas = info.data.get("kafka_replication_factor")
        if value is not None and replicas is not None and value > replicas:
            raise ValueError(f"{value} is more than the replication factor {replicas}: no write could succeed")
        return value

    @field_validator("store")
    @classmethod
    def _dsn(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        scheme = urlsplit(value).scheme
        if scheme not in ("chdb", "http", "https"):
            raise ValueError(f"expected a chdb:///ABSOLUTE/PATH, http:// or https:// DSN, got {redact_url(value)!r}")
        if scheme == "chdb" and not value.startswith("chdb:///"):
            raise ValueError(f"a chdb DSN needs an absolute path (chdb:///abs/path), got {redact_url(value)!r}")
        return value

    @field_validator("schema_registry")
    @classmethod
    def _registry_url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        value = value.strip()
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https", "mock") or not parts.netloc:
            raise ValueError(f"expected an http(s)://host[:port] or mock://name URL, got {redact_url(value)!r}")
        return value

    @field_validator("store_cluster")
    @classmethod
    def _cluster_needs_a_server(cls, value: str | None, info: ValidationInfo) -> str | None:
        store = info.data.get("store")
        if value and (store is None or store.startswith("chdb://")):
            raise ValueError("a cluster needs a ClickHouse server: set TRAINWIRE_STORE to an http(s):// DSN")
        return value or None

    @field_validator("dashboard_trusted_proxies", mode="before")
    @classmethod
    def _proxy_list(cls, value: object) -> object:
        """A list (TOML), or one string: comma-separated or a JSON list (an environment variable)."""
        if isinstance(value, str):
            text = value.strip()
            return json.loads(text) if text.startswith("[") else [p for p in text.replace(" ", "").split(",") if p]
        return value

    @field_validator("dashboard_auth")
    @classmethod
    def _proxy_needs_a_trust(cls, value: str, info: ValidationInfo) -> str:
        if value == "proxy" and not (info.data.get("dashboard_trusted_proxies") or info.data.get(
                "dashboard_proxy_secret")):
            raise ValueError("proxy needs TRAINWIRE_DASHBOARD_TRUSTED_PROXIES or TRAINWIRE_DASHBOARD_PROXY_SECRET: "
                             "else anyone could name themselves in the user header")
        return value

    @property
    def store_dsn(self) -> str:
        return self.store or f"chdb://{self.home / 'chdb'}"

    @property
    def embedded_store(self) -> bool:
        return self.store_dsn.startswith("chdb://")

    @property
    def spool_dir(self) -> Path:
        return self.home / "spool"

    @property
    def local_log_path(self) -> Path:
        return self.home / "log.db"

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"


def load_settings(**overrides: object) -> Settings:
    """Build settings from CLI overrides, the environment and the config file, naming what is wrong and where."""
    known = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields} | OTHER_VARIABLES
    unknown = sorted(k for k in os.environ if k.startswith(ENV_PREFIX) and k not in known)
    if unknown:
        raise ConfigError(f"unknown setting {unknown[0]}{_nearest(unknown[0], known)} (rename or unset it; "
                          "README, \"Configuration\", lists every setting)")
    config_file = os.environ.get(CONFIG_FILE_VARIABLE)
    if config_file and not Path(config_file).is_file():
        raise ConfigError(f"{CONFIG_FILE_VARIABLE}: no such file {config_file!r}")
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as err:
        problems = "; ".join(f"{_where(e['loc'], config_file)}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"invalid trainwire configuration: {problems}") from None
    except SettingsError as err:  # a variable that is not the JSON its field takes
        field = re.search(r'field "(\w+)"', str(err))
        where = _where((field[1],), config_file) if field else CONFIG_FILE_VARIABLE
        raise ConfigError(f"invalid trainwire configuration: {where}: not valid JSON (this setting takes a JSON "
                          "value, e.g. an object: README, \"Configuration\"; or set it as a table in a "
                          f"{CONFIG_FILE_VARIABLE} file)") from None
    except ValueError as err:  # a config file that is not TOML
        if not config_file:  # then not about the file: never "cannot read None"
            raise ConfigError(f"invalid trainwire configuration: {' '.join(str(err).split())}") from None
        raise ConfigError(f"{CONFIG_FILE_VARIABLE}: cannot read {config_file!r}: {err}") from None


def _nearest(name: str, known: set[str]) -> str:
    """ ": did you mean TRAINWIRE_KAFKA?" for a misspelt TRAINWIRE_KAFAK, or nothing when no name is close."""
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
    return f": did you mean {close[0]}?" if close else ""


def _where(loc: tuple, config_file: str | None) -> str:
    """The variable, or the key of the config file, that a validation error is about."""
    field = str(loc[0]) if loc else "?"
    variable = f"{ENV_PREFIX}{field.upper()}"
    if variable in os.environ or not config_file:
        return variable
    written = _file_keys(config_file)
    if field.startswith("kafka") and "kafka" in written and isinstance(written["kafka"], dict):
        loc = (table_key(field), *loc[1:])  # the [kafka] table: kafka.sasl_password
    elif field not in written:
        return variable  # a check that reads several settings, about one set nowhere
    return f"{'.'.join(map(str, loc))} (in {config_file})"  # nested tables: detectors.loss_spike.factor


def _file_keys(config_file: str) -> dict:
    try:
        with open(config_file, "rb") as file:
            return tomllib.load(file)
    except (OSError, ValueError):
        return {}
