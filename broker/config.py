"""Settings: one frozen object, read once from the environment. Nothing else reads os.environ."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

from broker.money import MoneyFormatError, parse_usd

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_OPENROUTER_BASE_URL = "https://openrouter.ai/api/v1"


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    listen: str = DEFAULT_LISTEN
    # None: start the embedded PostgreSQL server in data_dir.
    database_url: str | None = None
    data_dir: Path = Path(".keybroker")
    # None: generated into data_dir in embedded mode; required with a database URL.
    master_key: str | None = None
    # None: run against the in-process OpenRouter sandbox.
    management_key: str | None = None
    openrouter_base_url: str = DEFAULT_OPENROUTER_BASE_URL
    reservation_ttl: timedelta = timedelta(minutes=15)
    db_pool_min: int = 2
    db_pool_max: int = 10
    # Per-statement deadline; a database that does not answer gives UNAVAILABLE, not a hang.
    db_command_timeout: float = 5.0
    db_connect_timeout: float = 5.0
    # 0 disables asyncpg's prepared-statement cache (needed behind PgBouncer in transaction mode
    # before PgBouncer 1.21; see README "PgBouncer").
    db_statement_cache_size: int = 1024
    provider_timeout: float = 10.0
    # How long a caller-token lookup is cached in-process; revocation takes effect within this.
    token_cache_seconds: float = 5.0
    # How often background tasks (key retirement, reservation expiry) look for work.
    background_interval: timedelta = timedelta(seconds=2)
    # How often each replica reads the key change log for WatchKeys (NOTIFY only makes it sooner).
    event_poll_interval: timedelta = timedelta(milliseconds=500)
    log_format: str = "text"
    log_level: str = "INFO"
    shutdown_grace: float = 10.0
    # Key lifecycle (issue 3): an unfinished key creation older than this is rolled back.
    intent_timeout: timedelta = timedelta(seconds=30)
    # Periodic reconciliation with OpenRouter; zero turns it off.
    reconcile_interval: timedelta = timedelta(minutes=10)
    # Spend drift (OpenRouter vs recorded) that the reconciler reports.
    drift_tolerance_usd: Decimal = Decimal("0.01")
    # Scheduled rotation of keys older than this (None: off), each with rotate_grace.
    rotate_after: timedelta | None = None
    rotate_grace: timedelta = timedelta(hours=1)
    # ReportKeyInvalid checks a user's key at OpenRouter at most once per this interval.
    invalid_report_interval: timedelta = timedelta(seconds=60)
    # Usage alerts: percentages of the monthly limit that fire once per month each.
    alert_thresholds: tuple[Decimal, ...] = (Decimal(80), Decimal(100))
    # Webhook URLs (Slack incoming webhooks or any JSON receiver) that get every alert.
    alert_webhooks: tuple[str, ...] = ()
    # ANOMALY when spend in the current hour > factor x trailing hourly average and > floor.
    anomaly_factor: Decimal = Decimal(5)
    anomaly_floor_usd: Decimal = Decimal(1)
    # How often anomaly detection and pruning of old rate-limit windows run (at least
    # background_interval).
    anomaly_interval: timedelta = timedelta(seconds=60)
    # Prometheus endpoint HOST:PORT (KEYBROKER_METRICS_LISTEN; "off" disables it).
    metrics_listen: str | None = "127.0.0.1:9464"
    # Caller token the command line uses for gRPC commands (KEYBROKER_TOKEN).
    cli_token: str | None = None
    # Transport security (see broker/tls.py). Server: certificate chain and key (both or neither);
    # a client CA turns on mutual TLS (every client must present a certificate it signed).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # Command line (gRPC commands): the CA to trust for the server, and an optional client cert/key.
    tls_ca: Path | None = None
    tls_client_cert: Path | None = None
    tls_client_key: Path | None = None
    # End-user binding (see broker/user_binding.py): with an HS256 secret and/or a JWKS file,
    # GetKey and CheckLimit require an `x-user-jwt` whose `sub` is the request's user_id.
    user_jwt_secret: str | None = None
    user_jwks_file: Path | None = None
    user_jwt_audience: str | None = None
    user_jwt_leeway: timedelta = timedelta(seconds=30)

    def __post_init__(self) -> None:
        _check_pairs(self)

    def __repr__(self) -> str:  # never show secrets
        return (
            f"Settings(listen={self.listen!r}, database_url={'set' if self.database_url else None}, "
            f"data_dir={str(self.data_dir)!r}, management_key={'set' if self.management_key else None})"
        )

    @property
    def embedded_database(self) -> bool:
        return self.database_url is None

    @property
    def uses_sandbox(self) -> bool:
        return self.management_key is None

    @property
    def user_binding(self) -> bool:
        return self.user_jwt_secret is not None or self.user_jwks_file is not None

    def with_overrides(self, **changes: object) -> Settings:
        return replace(self, **changes)  # type: ignore[arg-type]


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from the environment (or the given mapping, for tests)."""
    env = os.environ if env is None else env

    def get(name: str) -> str | None:
        return (env.get(name) or "").strip() or None

    management_key = get("OPENROUTER_MANAGEMENT_KEY") or get("OPENROUTER_PROVISIONING_KEY")
    database_url = get("KEYBROKER_DATABASE_URL")
    master_key = get("KEYBROKER_MASTER_KEY")
    if database_url and not master_key:
        raise ConfigError(
            "KEYBROKER_MASTER_KEY is required with KEYBROKER_DATABASE_URL "
            "(base64 of 32 random bytes, or ID:BASE64,... )"
        )
    defaults = Settings()
    return Settings(
        listen=get("KEYBROKER_LISTEN") or DEFAULT_LISTEN,
        database_url=database_url,
        data_dir=Path(get("KEYBROKER_DATA_DIR") or ".keybroker"),
        master_key=master_key,
        management_key=management_key,
        openrouter_base_url=(get("OPENROUTER_BASE_URL") or DEFAULT_OPENROUTER_BASE_URL).rstrip("/"),
        reservation_ttl=_duration(env, "KEYBROKER_RESERVATION_TTL", defaults.reservation_ttl),
        db_pool_min=_int(env, "KEYBROKER_DB_POOL_MIN", defaults.db_pool_min, 0),
        db_pool_max=_int(env, "KEYBROKER_DB_POOL_MAX", defaults.db_pool_max, 1),
        db_command_timeout=_float(env, "KEYBROKER_DB_TIMEOUT", defaults.db_command_timeout),
        db_connect_timeout=_float(env, "KEYBROKER_DB_CONNECT_TIMEOUT", defaults.db_connect_timeout),
        db_statement_cache_size=_int(
            env, "KEYBROKER_DB_STATEMENT_CACHE_SIZE", defaults.db_statement_cache_size, 0
        ),
        provider_timeout=_float(env, "KEYBROKER_PROVIDER_TIMEOUT", defaults.provider_timeout),
        token_cache_seconds=_float(
            env, "KEYBROKER_TOKEN_CACHE_SECONDS", defaults.token_cache_seconds, minimum=0.0
        ),
        background_interval=_duration(env, "KEYBROKER_BACKGROUND_INTERVAL", defaults.background_interval),
        event_poll_interval=_positive_duration(
            env, "KEYBROKER_EVENT_POLL_INTERVAL", defaults.event_poll_interval
        ),
        log_format=_choice(env, "KEYBROKER_LOG_FORMAT", ("text", "json"), defaults.log_format),
        log_level=_choice(
            env, "KEYBROKER_LOG_LEVEL", ("DEBUG", "INFO", "WARNING", "ERROR"), defaults.log_level
        ),
        shutdown_grace=_float(env, "KEYBROKER_SHUTDOWN_GRACE", defaults.shutdown_grace),
        cli_token=get("KEYBROKER_TOKEN"),
        metrics_listen=_metrics_listen(get("KEYBROKER_METRICS_LISTEN")),
        alert_thresholds=_thresholds(env, "KEYBROKER_ALERT_THRESHOLDS", defaults.alert_thresholds),
        alert_webhooks=tuple(
            url.strip() for url in (get("KEYBROKER_ALERT_WEBHOOKS") or "").split(",") if url.strip()
        ),
        anomaly_factor=_usd(env, "KEYBROKER_ANOMALY_FACTOR", defaults.anomaly_factor),
        anomaly_floor_usd=_usd(env, "KEYBROKER_ANOMALY_FLOOR_USD", defaults.anomaly_floor_usd),
        anomaly_interval=_positive_duration(env, "KEYBROKER_ANOMALY_INTERVAL", defaults.anomaly_interval),
        intent_timeout=_positive_duration(env, "KEYBROKER_INTENT_TIMEOUT", defaults.intent_timeout),
        reconcile_interval=_duration(env, "KEYBROKER_RECONCILE_INTERVAL", defaults.reconcile_interval),
        drift_tolerance_usd=_usd(env, "KEYBROKER_DRIFT_TOLERANCE_USD", defaults.drift_tolerance_usd),
        rotate_after=_duration(env, "KEYBROKER_ROTATE_AFTER", timedelta(0)) or None,
        rotate_grace=_duration(env, "KEYBROKER_ROTATE_GRACE", defaults.rotate_grace),
        invalid_report_interval=_duration(
            env, "KEYBROKER_INVALID_REPORT_INTERVAL", defaults.invalid_report_interval
        ),
        tls_cert=_path(get("KEYBROKER_TLS_CERT")),
        tls_key=_path(get("KEYBROKER_TLS_KEY")),
        tls_client_ca=_path(get("KEYBROKER_TLS_CLIENT_CA")),
        tls_ca=_path(get("KEYBROKER_TLS_CA")),
        tls_client_cert=_path(get("KEYBROKER_TLS_CLIENT_CERT")),
        tls_client_key=_path(get("KEYBROKER_TLS_CLIENT_KEY")),
        user_jwt_secret=get("KEYBROKER_USER_JWT_SECRET"),
        user_jwks_file=_path(get("KEYBROKER_USER_JWKS_FILE")),
        user_jwt_audience=get("KEYBROKER_USER_JWT_AUDIENCE"),
        user_jwt_leeway=_duration(env, "KEYBROKER_USER_JWT_LEEWAY", defaults.user_jwt_leeway),
    )


def child_environment(overrides: Mapping[str, str]) -> dict[str, str]:
    """This process's environment with `overrides`: for the workers of `serve --workers N`,
    which read their Settings from it (kept here: nothing else reads os.environ)."""
    return {**os.environ, **overrides}


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


# HS256 keys shorter than the hash are weak (RFC 7518 section 3.2); Supabase's secrets are longer.
MIN_JWT_SECRET_BYTES = 32


def _check_pairs(settings: Settings) -> None:
    """Settings that only make sense together (checked however Settings is built). The messages
    name the variables, never a value."""
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise ConfigError(
            "KEYBROKER_TLS_CERT and KEYBROKER_TLS_KEY go together: set both (the server's certificate "
            "chain and its private key, PEM files) or neither"
        )
    if settings.tls_client_ca is not None and settings.tls_cert is None:
        raise ConfigError(
            "KEYBROKER_TLS_CLIENT_CA needs KEYBROKER_TLS_CERT and KEYBROKER_TLS_KEY: client "
            "certificates are checked only over TLS"
        )
    if (settings.tls_client_cert is None) != (settings.tls_client_key is None):
        raise ConfigError(
            "KEYBROKER_TLS_CLIENT_CERT and KEYBROKER_TLS_CLIENT_KEY go together: set both or neither"
        )
    if settings.tls_client_cert is not None and settings.tls_ca is None:
        raise ConfigError(
            "KEYBROKER_TLS_CLIENT_CERT needs KEYBROKER_TLS_CA (the CA that signed the broker's certificate)"
        )
    secret = settings.user_jwt_secret
    if secret is not None and len(secret.encode()) < MIN_JWT_SECRET_BYTES:
        raise ConfigError(f"KEYBROKER_USER_JWT_SECRET: must be at least {MIN_JWT_SECRET_BYTES} bytes")


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)?$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> timedelta:
    """'15m', '30s', '2h', '30d', '250ms', or plain seconds."""
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30s, 15m, 2h, 30d)")
    number, unit = match.groups()
    return timedelta(seconds=float(number) * _UNIT_SECONDS[unit or "s"])


def _duration(env: Mapping[str, str], name: str, default: timedelta) -> timedelta:
    raw = env.get(name)
    if not raw:
        return default
    try:
        return parse_duration(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def _positive_duration(env: Mapping[str, str], name: str, default: timedelta) -> timedelta:
    value = _duration(env, name, default)
    if value <= timedelta(0):
        raise ConfigError(f"{name}: must be greater than zero")
    return value


def _metrics_listen(raw: str | None) -> str | None:
    if raw is None:
        return Settings.metrics_listen
    if raw.lower() in ("off", "none", "0"):
        return None
    _, sep, port = raw.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError("KEYBROKER_METRICS_LISTEN: must be HOST:PORT or off")
    return raw


def _thresholds(env: Mapping[str, str], name: str, default: tuple[Decimal, ...]) -> tuple[Decimal, ...]:
    raw = env.get(name)
    if not raw:
        return default
    try:
        values = sorted({parse_usd(part.strip()) for part in raw.split(",") if part.strip()})
    except MoneyFormatError:
        raise ConfigError(f"{name}: give percentages such as 80,100") from None
    if not values or values[0] <= 0 or values[-1] > 1000:
        raise ConfigError(f"{name}: percentages must be between 0 and 1000")
    return tuple(values)


def _usd(env: Mapping[str, str], name: str, default: Decimal) -> Decimal:
    raw = env.get(name)
    if not raw:
        return default
    try:
        return parse_usd(raw)
    except MoneyFormatError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def _int(env: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}: not an integer: {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name}: must be at least {minimum}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, minimum: float = 0.001) -> float:
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}: not a number: {raw!r}") from None
    if not value >= minimum:
        raise ConfigError(f"{name}: must be at least {minimum}")
    return value


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...], default: str) -> str:
    raw = env.get(name)
    if not raw:
        return default
    if raw not in choices:
        raise ConfigError(f"{name}: must be one of {', '.join(choices)}")
    return raw
