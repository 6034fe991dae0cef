"""Typed settings: one frozen model per config section, validated when built.

In the manner of uvicorn's ``Config.load()`` and arq's ``RedisSettings.from_dsn``: loading (TOML
file, then ``ACCOUNTD_<SECTION>__<KEY>`` environment overrides) is kept apart from use, and every
unknown key or bad value becomes one `ConfigError` line naming the dotted key. Nothing here opens
a socket or a database; the daemon gets a finished, immutable `Settings` (a SIGHUP reload builds
a new one with `load_settings(settings.source_path)`).
"""

from __future__ import annotations

import ipaddress
import json
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_origin
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from accountd.adapters.db import DATABASE_KEYS, PoolSettings, safe_url
from accountd.errors import ConfigError
from accountd.logs import redact

ENV_PREFIX = "ACCOUNTD_"
# Variables under these prefixes belong to the test suite and the benchmarks, not to the config
# (``ACCOUNTD_TEST_MYSQL_URL``), and ``ACCOUNTD_SOCKET`` to accountctl (which socket to talk to);
# every other ACCOUNTD_* variable must name a real key.
ENV_RESERVED_PREFIXES: tuple[str, ...] = ("ACCOUNTD_TEST_", "ACCOUNTD_BENCH_", "ACCOUNTD_SOCKET")
DEFAULT_STATE_DIR = Path("./var")
SUPPORTED_DRIVERS: tuple[str, ...] = ("sqlite+aiosqlite", "mysql+aiomysql")
MASK = "***"
# Keys whose values must never be echoed, not even in an error message.
SECRET_KEYS: frozenset[str] = frozenset(
    {"ingest.token", *(f"databases.{key}" for key in DATABASE_KEYS)}
)
# sun_path is 108 bytes on Linux; longer socket paths fail only when the daemon binds.
_MAX_SOCKET_PATH = 107


# --------------------------------------------------------------------------- value types


def _reject_bool(value: Any) -> Any:
    # pydantic's lax mode reads `timeout = true` as 1.0; in a config file that is always a slip.
    if isinstance(value, bool):
        raise PydanticCustomError("number_type", "Input should be a number, not a boolean")
    return value


Seconds = Annotated[float, BeforeValidator(_reject_bool), Field(gt=0)]
SecondsOrZero = Annotated[float, BeforeValidator(_reject_bool), Field(ge=0)]
Count = Annotated[int, BeforeValidator(_reject_bool), Field(ge=1)]
CountOrZero = Annotated[int, BeforeValidator(_reject_bool), Field(ge=0)]
Id = Annotated[int, BeforeValidator(_reject_bool), Field(ge=0)]

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*$")


def split_listen(value: str) -> tuple[str, int]:
    """Split ``host:port`` / ``[v6]:port`` into (host, port); raise ValueError when malformed."""
    if value.startswith("["):
        host, sep, port_text = value[1:].partition("]:")
        if not sep:
            raise ValueError("expected '[ipv6]:port'")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep or not host:
            raise ValueError("expected 'host:port' (IPv6 as '[::1]:port')")
        if ":" in host:
            raise ValueError("an IPv6 address must be written in brackets: '[::1]:port'")
        numeric = all(c.isdigit() or c == "." for c in host)
        if not _HOSTNAME.match(host) or (numeric and not _is_ipv4(host)):
            raise ValueError(f"{host!r} is not a valid host name or address")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"port {port_text!r} is not a number from 0 to 65535")
    return host, int(port_text)


def _is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a DNS name other than localhost may resolve anywhere


def _check_listen(value: str) -> str:
    host, port = split_listen(value)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check_db_url(value: str) -> str:
    # Messages here never include the value: the URL may carry a password.
    try:
        url = make_url(value)
    except ArgumentError:
        raise ValueError("not a valid SQLAlchemy URL") from None
    if url.drivername not in SUPPORTED_DRIVERS:
        raise ValueError(
            f"unsupported driver {url.drivername!r} (use {' or '.join(SUPPORTED_DRIVERS)})"
        )
    if url.get_backend_name() == "sqlite":
        if not url.database or url.database == ":memory:":
            raise ValueError("needs a file path (an in-memory database would lose every state)")
    elif not url.database:
        raise ValueError("needs a database name, e.g. mysql+aiomysql://user@host/saas_unified_core")
    return value


def _check_http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http:// or https:// URL with a host")
    try:
        _ = parts.port
    except ValueError:
        raise ValueError("the port is not a number from 0 to 65535") from None
    return value.rstrip("/")  # callers append "/v1/..." paths


ListenAddress = Annotated[str, AfterValidator(_check_listen)]
DatabaseUrl = Annotated[str, AfterValidator(_check_db_url)]
HttpUrl = Annotated[str, AfterValidator(_check_http_url)]


def _cross_field(field: str, detail: str) -> PydanticCustomError:
    """An error about one field found by a section-level check; `_describe` names the field."""
    return PydanticCustomError("cross_field", "{detail}", {"field": field, "detail": detail})


# --------------------------------------------------------------------------- sections


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class DatabasesSettings(_Section):
    # The real defaults live under state_dir; `Settings` fills them in before validation.
    core: DatabaseUrl = "sqlite+aiosqlite:///var/core.db"
    platform: DatabaseUrl = "sqlite+aiosqlite:///var/platform.db"
    analytics: DatabaseUrl = "sqlite+aiosqlite:///var/analytics.db"
    pool_size: Count = 10
    max_overflow: CountOrZero = 10
    pool_timeout: Seconds = 10
    pool_recycle: Seconds = 3600
    connect_timeout: Seconds = 5
    # `accountd run`: keep retrying (with backoff) a database that is down at start-up for this
    # long, then exit non-zero. 0 = one attempt.
    startup_timeout: SecondsOrZero = 60


class ControlSettings(_Section):
    socket: Path = Path("var/control.sock")
    group: str | None = None
    admin_uids: list[Id] = []
    admin_gids: list[Id] = []
    readonly_uids: list[Id] = []
    readonly_gids: list[Id] = []

    @field_validator("group")
    @classmethod
    def _group_not_empty(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty (leave it out to keep the daemon's own group)")
        return value


class _Listener(_Section):
    listen: ListenAddress

    @property
    def host(self) -> str:
        return split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return split_listen(self.listen)[1]


class IngestSettings(_Listener):
    listen: ListenAddress = "127.0.0.1:8470"
    token: SecretStr | None = None
    max_batch: Count = 10_000
    max_body_bytes: Count = 8_388_608
    request_timeout: Seconds = 30

    @field_validator("token")
    @classmethod
    def _token_usable(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        secret = value.get_secret_value()
        if not secret:
            raise ValueError("must not be empty")
        if secret != secret.strip() or any(c.isspace() for c in secret):
            raise ValueError("must not contain whitespace (it travels in an HTTP header)")
        return value


class MetricsSettings(_Listener):
    listen: ListenAddress = "127.0.0.1:9464"
    per_tenant: bool = False
    refresh_interval: Seconds = 5
    ping_interval: Seconds = 2
    heartbeat_sample: Count = 20_000


class WorkerSettings(_Section):
    url: HttpUrl = "http://127.0.0.1:8480"
    timeout: Seconds = 5
    max_connections: Count = 100


class HeartbeatSettings(_Section):
    timeout: Seconds = 45
    persist_interval: Seconds = 15
    flush_interval: Seconds = 1
    db_poll_interval: Seconds = 5
    startup_grace: SecondsOrZero = 60
    # A gap this long between ticks of the daemon's own clock task means the process was stopped
    # or starved: checks that fell into it are moved instead of fired (accountd.daemon.outage).
    stall_after: Seconds = 2


class DeadlinesSettings(_Section):
    initializing: Seconds = 60
    waiting_qr: Seconds = 120
    waiting_confirm: Seconds = 120
    verifying: Seconds = 120
    recovering: Seconds = 60
    qr_max_refreshes: CountOrZero = 3


class RecoverySettings(_Section):
    base: Seconds = 10
    cap: Seconds = 300
    max_attempts: Count = 8
    reset_after: Seconds = 600
    error_retry_after: SecondsOrZero = 1800
    max_in_flight: Count = 50
    start_rate: Seconds = 10  # starts per second; same constraint (> 0) as a duration
    flap_count: Count = 5
    flap_window: Seconds = 600
    mass_offline_ratio: Annotated[float, BeforeValidator(_reject_bool), Field(gt=0, le=1)] = 0.3
    mass_offline_window: Seconds = 120
    mass_offline_cooldown: SecondsOrZero = 300

    @model_validator(mode="after")
    def _cap_not_below_base(self) -> RecoverySettings:
        if self.cap < self.base:
            raise _cross_field("cap", f"must be >= recovery.base ({self.base:g}), got {self.cap:g}")
        return self


class SupervisorSettings(_Section):
    poll_interval: Seconds = 2
    load_page_size: Count = 5000
    transition_batch: Count = 500
    # Batches of at least this many changes write their supervision rows as one journal row,
    # folded into accountd_supervision later (docs/architecture.md, "The supervision journal").
    # 0 = never.
    journal_min_batch: CountOrZero = 200
    # Most status changes waiting for a commit (the bound on memory while the database is
    # down); beyond it ingest answers 503 with Retry-After. About 0.5 KB each.
    max_pending_changes: Count = 200_000
    shutdown_timeout: Seconds = 20


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


class LoggingSettings(_Section):
    level: Annotated[Literal["debug", "info", "warning", "error"], BeforeValidator(_lower)] = "info"
    format: Annotated[Literal["text", "json"], BeforeValidator(_lower)] = "text"


class RetentionSettings(_Section):
    account_metrics_days: Count = 90
    message_records_days: Count = 180
    operation_logs_days: Count = 365
    partitions_ahead: Count = 2


SnapshotMetric = Literal[
    "heartbeat_age_seconds", "online_seconds", "recoveries", "recovery_attempts", "transitions"
]


def _check_hhmm(value: str) -> str:
    hours, sep, minutes = value.partition(":")
    if not sep or not (hours.isdigit() and minutes.isdigit()) or len(minutes) != 2:
        raise ValueError("expected HH:MM (UTC), e.g. '00:10'")
    if not (0 <= int(hours) <= 23 and 0 <= int(minutes) <= 59):
        raise ValueError(f"{value!r} is not a time of day")
    return value


class MonitoringSettings(_Section):
    """Alerts (system_alerts), snapshots (account_metrics), rollup, partition upkeep."""

    alerts: bool = True
    db_check_interval: Seconds = 10
    db_down_after: SecondsOrZero = 30
    snapshot_interval: SecondsOrZero = 300  # 0 = off
    snapshot_metrics: list[SnapshotMetric] = [
        "heartbeat_age_seconds",
        "online_seconds",
        "recoveries",
    ]
    snapshot_chunk: Count = 1000
    rollup: bool = True
    rollup_time: Annotated[str, AfterValidator(_check_hhmm)] = "00:10"
    rollup_check_interval: Seconds = 600
    partition_upkeep_interval: SecondsOrZero = 3600  # 0 = off


# --------------------------------------------------------------------------- the whole


class Settings(_Section):
    state_dir: Path = DEFAULT_STATE_DIR
    databases: DatabasesSettings = DatabasesSettings()
    control: ControlSettings = ControlSettings()
    ingest: IngestSettings = IngestSettings()
    metrics: MetricsSettings = MetricsSettings()
    worker: WorkerSettings = WorkerSettings()
    heartbeat: HeartbeatSettings = HeartbeatSettings()
    deadlines: DeadlinesSettings = DeadlinesSettings()
    recovery: RecoverySettings = RecoverySettings()
    supervisor: SupervisorSettings = SupervisorSettings()
    logging: LoggingSettings = LoggingSettings()
    retention: RetentionSettings = RetentionSettings()
    monitoring: MonitoringSettings = MonitoringSettings()

    _source_path: Path | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _defaults_under_state_dir(cls, data: Any) -> Any:
        """Resolve state_dir, then place unset database files and the socket inside it."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        raw = data.get("state_dir", DEFAULT_STATE_DIR)
        if not isinstance(raw, str | Path):
            return data  # the field validator reports the type error
        # Absolute, so the paths `config check` prints are the ones the daemon opens.
        state_dir = Path(raw).absolute()
        data["state_dir"] = state_dir
        for section, defaults in (
            (
                "databases",
                {key: f"sqlite+aiosqlite:///{state_dir / key}.db" for key in DATABASE_KEYS},
            ),
            ("control", {"socket": state_dir / "control.sock"}),
        ):
            given = data.get(section, {})
            if isinstance(given, dict):
                data[section] = {**defaults, **given}
        return data

    @property
    def source_path(self) -> Path | None:
        """The TOML file these settings were loaded from (None: defaults + environment)."""
        return self._source_path

    def database_urls(self) -> dict[str, str]:
        """Plain URL strings (passwords included) for `accountd.adapters.db.Databases`."""
        return {key: str(getattr(self.databases, key)) for key in DATABASE_KEYS}

    def pool(self) -> PoolSettings:
        db = self.databases
        return PoolSettings(
            size=db.pool_size,
            max_overflow=db.max_overflow,
            timeout=db.pool_timeout,
            recycle=db.pool_recycle,
            connect_timeout=db.connect_timeout,
        )

    def secrets(self) -> list[str]:
        """Every secret value in these settings, for `accountd.logs.register_secret`."""
        found: list[str] = []
        if self.ingest.token is not None:
            found.append(self.ingest.token.get_secret_value())
        for url in self.database_urls().values():
            password = make_url(url).password
            if password:
                found.append(str(password))
        return found

    def masked(self) -> dict[str, Any]:
        """The effective config as plain JSON-able data, with the token and passwords masked."""
        data: dict[str, Any] = self.model_dump(mode="json")
        data["ingest"]["token"] = None if self.ingest.token is None else MASK
        for key in DATABASE_KEYS:
            data["databases"][key] = safe_url(getattr(self.databases, key))
        return data

    def require_runnable(self) -> None:
        """What `config check` tolerates but `accountd run` must refuse."""
        if self.ingest.token is None:
            raise ConfigError(
                "config error: ingest.token: required to run the daemon "
                "(set it in the config file or in ACCOUNTD_INGEST__TOKEN)"
            )

    def warnings(self) -> list[str]:
        """Legal but risky choices, one line each (printed by `config check`)."""
        notes: list[str] = []
        if self.ingest.token is None:
            notes.append("ingest.token: not set; `accountd run` will refuse to start without it")
        elif len(self.ingest.token.get_secret_value()) < 16:
            notes.append("ingest.token: shorter than 16 characters; use a long random value")
        for name, listener in (("ingest", self.ingest), ("metrics", self.metrics)):
            if not is_loopback(listener.host):
                notes.append(
                    f"{name}.listen: {listener.listen} is not a loopback address; "
                    "make sure a firewall keeps it off untrusted networks"
                )
        if len(str(self.control.socket).encode()) > _MAX_SOCKET_PATH:
            notes.append(
                f"control.socket: path longer than {_MAX_SOCKET_PATH} bytes; binding will fail"
            )
        if self.heartbeat.persist_interval >= self.heartbeat.timeout:
            notes.append(
                "heartbeat.persist_interval: not below heartbeat.timeout; readers of "
                "last_heartbeat_at will see live accounts as stale"
            )
        return notes


# --------------------------------------------------------------------------- loading


def load_settings(path: Path | None, env: Mapping[str, str] | None = None) -> Settings:
    """Read the TOML file (if any), apply environment overrides, validate.

    `env` defaults to ``os.environ``. Raises `ConfigError` with a one-line message naming the
    dotted key (or the file and line, for TOML syntax errors).
    """
    if env is None:
        import os

        env = os.environ
    data: dict[str, Any] = _read_toml(path) if path is not None else {}
    state_directory = env.get("STATE_DIRECTORY")
    if "state_dir" not in data and state_directory:
        # systemd's StateDirectory=; several directories are colon-separated, the first is ours.
        data["state_dir"] = state_directory.split(":", 1)[0]
    origins = _apply_env(data, env)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, origins)) from None
    settings._source_path = path
    return settings


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config error: {path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"config error: {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        # The message already ends in "(at line N, column M)".
        raise ConfigError(f"config error: {path}: invalid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config error: {path}: not UTF-8 text") from None


def _apply_env(data: dict[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    """Overlay ``ACCOUNTD_*`` variables on `data`; return {dotted key: variable name}."""
    origins: dict[str, str] = {}
    sections = {
        name for name, field in Settings.model_fields.items() if _is_section(field.annotation)
    }
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX) or var.startswith(ENV_RESERVED_PREFIXES):
            continue
        name = var[len(ENV_PREFIX) :].lower()
        section, sep, key = name.partition("__")
        raw = env[var]
        if not sep:
            if section in sections:
                raise ConfigError(
                    f"config error: {section}: is a section; set its keys as "
                    f"{ENV_PREFIX}{section.upper()}__<KEY> (from {var})"
                )
            if section not in Settings.model_fields:
                raise ConfigError(f"config error: {section}: unknown key (from {var})")
            data[section] = raw
            origins[section] = var
            continue
        if section not in sections:
            raise ConfigError(f"config error: {section}: unknown section (from {var})")
        model = Settings.model_fields[section].annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        if key not in model.model_fields:
            raise ConfigError(f"config error: {section}.{key}: unknown key (from {var})")
        target = data.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"config error: {section}: must be a table, not a value")
        is_list = get_origin(model.model_fields[key].annotation) is list
        target[key] = _parse_env_list(raw) if is_list else raw
        origins[f"{section}.{key}"] = var
    return origins


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _parse_env_list(raw: str) -> Any:
    """``"0,1000"`` or ``"[0, 1000]"`` → list; pydantic then checks the items."""
    text = raw.strip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return raw  # reported by pydantic as "not a valid list", naming the key
    return [item.strip() for item in text.split(",") if item.strip()]


def _describe(exc: ValidationError, origins: Mapping[str, str]) -> str:
    """One line for the first error: ``config error: <dotted key>: <problem>``."""
    errors = exc.errors(include_url=False)
    err = errors[0]
    loc = [str(part) for part in err["loc"] if not isinstance(part, int)]
    indexes = "".join(f"[{part}]" for part in err["loc"] if isinstance(part, int))
    message = str(err["msg"]).removeprefix("Value error, ")
    ctx = err.get("ctx") or {}
    if err["type"] == "cross_field":
        loc.append(str(ctx["field"]))
    key = ".".join(loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        message = "unknown key"
    elif err["type"] != "cross_field" and key not in SECRET_KEYS and _echoable(err["input"]):
        message += f" (got {_short_repr(err['input'])})"
    if key in origins:
        message += f" (from {origins[key]})"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"config error: {key}{indexes}: {message}{more}"


def _echoable(value: Any) -> bool:
    # Scalars and lists help the reader; a whole mis-typed table would not fit on one line.
    return isinstance(value, str | int | float | bool | list)


def _short_repr(value: Any) -> str:
    # Redacted before it is cut: a URL cut before its '@' no longer looks like one, and its
    # password would go out whole (a hypothesis example: a URL inside a list of a path key).
    text = redact(repr(value))
    return text if len(text) <= 60 else text[:57] + "..."
