"""Typed environment configuration.

Every service reads its settings from the environment through one pydantic-settings
class, so a misconfigured deployment stops at start-up with one message naming every
bad variable instead of starting half-configured.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, IPvAnyNetwork, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

__all__ = ["ConfigError", "HeaderNames", "Settings", "load", "parse_rate"]


class HeaderNames(BaseModel):
    """Names of the headers kiban reads into the request context and forwards.

    Override one with e.g. ``HEADERS__UID=x-user-id``.
    """

    trace_id: str = "x-trace-id"
    request_id: str = "x-request-id"
    uid: str = "x-uid"
    user_agent: str = "x-forwarded-user-agent"
    user_ip: str = "x-user-ip"
    forwarded_for: str = "x-forwarded-for"
    api_client: str = "x-api-client"
    id_token: str = "x-internal-id-token"  # noqa: S105 (a header name)
    #: What is left of the caller's time budget, in milliseconds (trusted peers only).
    timeout: str = "x-request-timeout-ms"
    #: ``x-debug: 1`` turns on debug logs for that request only (when debug is enabled).
    debug: str = "x-debug"


class Settings(BaseSettings):
    """Settings every kiban service has. Subclass it to add a service's own."""

    model_config = SettingsConfigDict(
        env_nested_delimiter="__", extra="ignore", case_sensitive=False, frozen=True
    )

    service_name: str = "kiban-service"
    service_version: str = "0.0.0"

    #: The HTTP server: ``uvicorn`` (kiban's head deadline, split-proof head limit and
    #: problem+json for what the parser refuses) or ``granian`` (docs/server.md).
    server: Literal["uvicorn", "granian"] = "uvicorn"
    http_host: str = "127.0.0.1"
    http_port: int = Field(8000, ge=0, le=65535)
    #: A client must send its whole request head within this many seconds (slowloris).
    http_read_header_timeout: float = Field(10.0, gt=0)
    #: Idle keep-alive connections are closed after this; keep it above the load balancer's.
    http_keep_alive_timeout: float = Field(75.0, gt=0)
    #: After SIGTERM readiness is 503 and requests are still served for this long.
    http_drain_seconds: float = Field(5.0, ge=0)
    #: In-flight requests get this long to finish once the listener is closed; those
    #: still running then are answered 503 (or their connection closed) and abandoned.
    http_shutdown_timeout: float = Field(20.0, gt=0)
    #: Pools, clients and exporters get this long, all together, to close after that.
    #: The process exits by drain + shutdown timeout + this + 2 s, whatever they do.
    shutdown_cleanup_timeout: float = Field(3.0, gt=0)
    #: A request's whole body must arrive within this many seconds (408 past it).
    http_read_body_timeout: float = Field(30.0, gt=0)
    #: A response must be taken by the client within this many seconds a write; a
    #: client that stops reading is disconnected instead of holding the connection.
    http_write_timeout: float = Field(30.0, gt=0)
    #: The API default for a handler's time (504 past it, the handler cancelled);
    #: ``Timeout(...)``/``NoTimeout()`` on a router or route narrow it; 0: none.
    http_handler_timeout: float = Field(30.0, ge=0)
    #: Requests served at once before new ones get 503 (probes and /metrics exempt);
    #: 0: no cap.
    http_max_inflight: int = Field(0, ge=0)
    #: Adaptive shedding: while the event loop runs this many seconds late, requests
    #: past the capacity the service has shown get 503 (``docs/resilience.md``); 0: off.
    http_shed_loop_lag: float = Field(0.0, ge=0)
    #: Adaptive shedding on CPU: while the process uses more than this share of the CPU
    #: it can use (one core, or the cgroup's quota if less; go-zero's 0.9), the same
    #: rule applies; 0: off.
    http_shed_cpu: float = Field(0.0, ge=0, le=1)
    http_max_header_bytes: int = Field(16 * 1024, ge=1024)
    http_max_body_bytes: int = Field(1024 * 1024, ge=0)

    #: The gRPC server (when the service adds servicers): its own port, the HTTP host
    #: unless ``GRPC_HOST`` says otherwise, the HTTP shutdown budget.
    grpc_host: str | None = None
    grpc_port: int = Field(8081, ge=0, le=65535)
    grpc_max_receive_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    grpc_max_send_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    grpc_max_concurrent_streams: int = Field(100, ge=1)
    #: A client that pings more often than this without calls is sent away (GOAWAY).
    grpc_min_ping_interval: float = Field(10.0, gt=0)

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    #: One access line per request; turn off only where another layer writes them.
    access_log: bool = True
    #: Hold each request's info and debug lines; write them only if it fails (5xx, an
    #: exception, an error logged) or asks for debug, else drop them (docs/logging.md).
    log_buffering: bool = False
    #: Log output held in memory while stdout does not take it (a stalled collector or
    #: disk); past it new lines are dropped and counted, and the service goes on. At
    #: least four of the writer's 64 KiB chunks: held bytes count the chunk being written,
    #: and a bound of one chunk dropped lines while a healthy stdout took that chunk.
    log_max_held_bytes: int = Field(4 * 1024 * 1024, ge=256 * 1024)
    #: Query parameters whose values are replaced by ``[REDACTED]`` in the access log,
    #: besides any name containing token, password, secret or key.
    log_redact_params: frozenset[str] = frozenset({"code", "sig", "signature", "auth"})

    database_url: str = "sqlite+aiosqlite:///./kiban.db"
    #: Connections each database of the process keeps open and reuses. A request past
    #: them waits for one (``db.client.connection.count`` state ``waiting``).
    database_pool_size: int = Field(10, ge=1)
    #: Connections opened for a burst past the pool, closed as soon as they are given
    #: back: each costs a new connection (TLS included) per use, so 0 by default.
    database_max_overflow: int = Field(0, ge=0)
    #: Seconds a transaction (and the migration at start-up) waits for a connection to
    #: open, the server's handshake included: past it the request gets 503 instead of
    #: waiting on a host that does not answer (asyncpg waits 60 s, asyncmy for ever).
    database_connect_timeout: float = Field(5.0, gt=0)
    #: Upgrade the schema at start-up (``service.database(migrations=...)``): handy in
    #: development; in production run the migrations as a job before the rollout.
    migrate_on_start: bool = False
    redis_url: str | None = None
    #: Seconds the app's Redis (``service.redis()``) has to connect and to answer each
    #: command: a stalled Redis is a 503 in this time, not a request held to its handler's
    #: timeout. A blocking command (``BLPOP`` with a timeout) needs a longer one: pass
    #: ``socket_timeout`` to ``service.redis()``.
    redis_timeout: float = Field(1.0, gt=0)
    #: When the rate-limit storage (Redis) is unreachable: True lets requests through.
    ratelimit_fail_open: bool = True
    #: Bound on each rate-limit call to Redis; past it the fail policy applies.
    ratelimit_timeout: float = Field(0.25, gt=0)

    #: OTLP collector, e.g. ``http://otel-collector:4317`` (gRPC) or ``:4318`` (HTTP).
    otlp_endpoint: str | None = None
    otlp_protocol: Literal["grpc", "http/protobuf"] = "grpc"
    #: Send every log line (access lines too) to the collector as OTLP logs as well as
    #: to stdout: where logs are not collected from stdout, and under ``kiban dev``.
    otlp_logs: bool = False
    #: Share of new traces sampled (parent-based: an upstream decision is followed).
    trace_sample_ratio: float = Field(1.0, ge=0, le=1)
    metrics_export_interval: float = Field(10.0, gt=0)
    #: Spans go to the exporter in batches of this many, or after this many seconds.
    trace_export_batch: int = Field(512, ge=1)
    trace_export_delay: float = Field(5.0, gt=0)
    #: Spans held for a slow exporter; past this the oldest are dropped (and counted).
    trace_export_queue: int = Field(2048, ge=1)
    #: Requests to these paths make no span and no HTTP metrics (probes and scrapes).
    telemetry_exclude_paths: frozenset[str] = frozenset(
        {"/health/liveness", "/health/readiness", "/metrics"}
    )

    #: With a DSN, unhandled exceptions are reported to Sentry.
    sentry_dsn: SecretStr | None = None
    sentry_environment: str | None = None

    #: Hosts the outgoing client treats as ours: they get the user headers and the
    #: identity token. Anything else gets none of them.
    internal_hosts: frozenset[str] = frozenset(
        {"localhost", "127.0.0.1", "::1", "*.svc", "*.svc.cluster.local", "*.internal"}
    )
    client_connect_timeout: float = Field(1.0, gt=0)
    client_read_timeout: float = Field(5.0, gt=0)
    client_retries: int = Field(2, ge=0, le=5)

    #: Mounts /debug (log level, payload logging, profiling); needs a debug_security.
    debug_endpoints: bool = False

    health_timeout: float = Field(0.8, gt=0)
    health_cache_seconds: float = Field(1.0, ge=0)

    headers: HeaderNames = HeaderNames()

    #: Peers (CIDRs or addresses) whose propagation headers are believed: the gateway,
    #: the mesh sidecar. None by default: then no header can claim a user, an IP or an
    #: upstream chain. ``TRUSTED_PROXIES=10.0.0.0/8,127.0.0.1``. See docs/security.md.
    trusted_proxies: Annotated[tuple[IPvAnyNetwork, ...], NoDecode] = ()
    #: An untrusted caller's ``traceparent``: a span ``link`` on a new trace (OTel's
    #: advice for public endpoints), ``follow`` it as the parent, or ``ignore`` it.
    trace_untrusted_parent: Literal["link", "follow", "ignore"] = "link"
    #: Host header values served (``*.example.com`` matches subdomains); others get 400.
    #: ``*`` serves any host. Starlette's TrustedHost rules.
    allowed_hosts: Annotated[tuple[str, ...], NoDecode] = ("*",)
    #: Failed authentications allowed per client IP before 429 (brute force); empty: off.
    auth_failure_limit: str | None = "20/minute"

    @field_validator("trusted_proxies", "allowed_hosts", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        """``a,b`` or a JSON list, from the environment."""
        if isinstance(value, str):
            value = value.strip()
            if value.startswith("["):
                return json.loads(value)
            return tuple(item.strip() for item in value.split(",") if item.strip())
        return value

    @field_validator(
        "log_level", "log_format", "otlp_protocol", "trace_untrusted_parent", mode="before"
    )
    @classmethod
    def _lower(cls, value: object) -> object:
        """Names of levels and modes are case-insensitive: ``LOG_LEVEL=INFO`` is info."""
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        """An async SQLAlchemy URL: ``postgresql+asyncpg://``, ``mysql+asyncmy://``, ..."""
        scheme, separator, _ = value.partition("://")
        if not separator or not re.fullmatch(r"[a-z][a-z0-9]*(\+[a-z0-9_]+)?", scheme):
            raise ValueError("not a database URL such as postgresql+asyncpg://host/db")
        dialect, _, driver = scheme.partition("+")
        if driver not in _ASYNC_DRIVERS.get(dialect, ()):
            known = ", ".join(f"{dialect}+{name}" for name in _ASYNC_DRIVERS.get(dialect, ()))
            raise ValueError(
                f"{scheme}:// is not an async driver; use "
                + (known or ", ".join(f"{d}+{n[0]}" for d, n in _ASYNC_DRIVERS.items()))
            )
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("not a Redis URL such as redis://host:6379/0")
        return value

    @field_validator("otlp_endpoint")
    @classmethod
    def _otlp_endpoint(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("not a collector URL such as http://otel-collector:4317")
        return value

    @field_validator("sentry_dsn")
    @classmethod
    def _sentry_dsn(cls, value: SecretStr | None) -> SecretStr | None:
        """Checked here: Sentry's own parser fails with a traceback at start-up."""
        if value is not None:
            parts = urlsplit(value.get_secret_value())
            if (
                parts.scheme not in ("http", "https")
                or not parts.username
                or not parts.hostname
                or not parts.path.strip("/").rpartition("/")[2].isdigit()
            ):
                raise ValueError("not a Sentry DSN such as https://key@host/project-id")
        return value

    @field_validator("auth_failure_limit")
    @classmethod
    def _rate(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        try:
            parse_rate(value)
        except ValueError:
            raise ValueError("not a rate such as 20/minute") from None
        return value


#: Seconds in each unit, as ``limits`` counts them (a month is 30 days, a year 12 months).
_UNITS = {
    "second": 1,
    "minute": 60,
    "hour": 3600,
    "day": 86400,
    "month": 30 * 86400,
    "year": 12 * 30 * 86400,
}
_RATE = re.compile(
    r"\s*([0-9]+)\s*(?:/|\s*per\s*)\s*([0-9]+)?\s*(second|minute|hour|day|month|year)s?\s*",
    re.IGNORECASE,
)


def parse_rate(text: str) -> tuple[int, int]:
    """``"100/minute"`` -> (100, 60): the amount and the window in seconds.

    The notation of the ``limits`` library (``10 per 5 minutes`` too), parsed here so
    that the in-memory limiter needs no library; ``tests/test_ratelimit.py`` holds the
    two parsers to the same answers.
    """
    match = _RATE.fullmatch(text)
    if match is None or int(match.group(1)) < 1 or match.group(2) == "0":
        raise ValueError(f"not a rate such as 100/minute: {text!r}")
    multiples = int(match.group(2) or 1)
    return int(match.group(1)), multiples * _UNITS[match.group(3).lower()]


#: The async drivers kiban's database support is tested with, by dialect.
_ASYNC_DRIVERS = {
    "postgresql": ("asyncpg", "psycopg"),
    "mysql": ("asyncmy", "aiomysql"),
    "mariadb": ("asyncmy", "aiomysql"),
    "sqlite": ("aiosqlite",),
}


class ConfigError(Exception):
    """The environment does not make a valid configuration; the message names every bad variable."""


S = TypeVar("S", bound=BaseSettings)


def load(settings_class: type[S]) -> S:
    """Read ``settings_class`` from the environment; one ConfigError names every problem."""
    try:
        return settings_class()
    except ValidationError as exc:
        raise ConfigError(_describe(settings_class, exc)) from None
    except SettingsError as exc:  # a value that is not the JSON its field needs
        found = re.search(r'field "([^"]+)"', str(exc))
        prefix = str(settings_class.model_config.get("env_prefix", ""))
        name = (prefix + found.group(1)).upper() if found else "a variable"
        raise ConfigError(
            f"invalid configuration, 1 bad variable:\n  {name}: not valid JSON for this setting"
        ) from None


def _describe(settings_class: type[BaseSettings], exc: ValidationError) -> str:
    prefix = str(settings_class.model_config.get("env_prefix", ""))
    delimiter = str(settings_class.model_config.get("env_nested_delimiter") or "__")
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        name = prefix + delimiter.join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        problems.append(f"  {name.upper()}: {message}")
    count = len(problems)
    noun = "variable" if count == 1 else "variables"
    return f"invalid configuration, {count} bad {noun}:\n" + "\n".join(problems)
