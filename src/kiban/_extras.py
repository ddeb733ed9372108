"""Optional features and the extras that bring their dependencies.

kiban's core is what every service needs on the request path. Exporting to an OTLP
collector, Sentry, a database, Redis, JWTs, profiling and the template tools each
come with an extra (``pip install 'kiban[otlp,db]'``). A feature used without its
extra stops the service at start-up with one line naming the extra, never an
``ImportError`` traceback from deep inside a request.
"""

from __future__ import annotations

import importlib.util

from kiban._config import ConfigError, Settings

__all__ = ["DRIVERS", "MissingExtra", "check_database", "check_settings", "installed", "require"]

#: The driver module each database dialect uses, and the extra that installs it.
DRIVERS = {
    "sqlite": ("aiosqlite", "db"),
    "postgresql": ("asyncpg", "postgres"),
    "mysql": ("asyncmy", "mysql"),
    "mariadb": ("asyncmy", "mysql"),
}


class MissingExtra(ConfigError, ImportError):
    """A feature is used whose optional dependencies are not installed."""


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def require(module: str, extra: str, feature: str) -> None:
    """Raise ``MissingExtra`` unless ``module`` is installed."""
    if not installed(module):
        raise MissingExtra(f"{feature} needs kiban[{extra}]: pip install 'kiban[{extra}]'")


def check_settings(settings: Settings) -> None:
    """Every feature the settings turn on has its extra; one error lists all missing."""
    needed = []
    if settings.otlp_endpoint is not None:
        protocol = "grpc" if settings.otlp_protocol == "grpc" else "http"
        needed.append((f"opentelemetry.exporter.otlp.proto.{protocol}", "otlp", "OTLP_ENDPOINT"))
    if settings.sentry_dsn is not None:
        needed.append(("sentry_sdk", "sentry", "SENTRY_DSN"))
    if settings.redis_url is not None:
        needed.append(("redis", "redis", "REDIS_URL"))
        needed.append(("limits", "redis", "REDIS_URL"))
    if settings.debug_endpoints:
        needed.append(("pyinstrument", "debug", "DEBUG_ENDPOINTS"))
    if settings.server == "granian":
        needed.append(("granian", "granian", "SERVER"))
    missing = [
        f"  {variable}: needs kiban[{extra}]: pip install 'kiban[{extra}]'"
        for module, extra, variable in needed
        if not installed(module)
    ]
    if missing:
        count = len(missing)
        noun = "variable" if count == 1 else "variables"
        raise MissingExtra(
            f"invalid configuration, {count} {noun} without {'its' if count == 1 else 'their'} "
            "extra:\n" + "\n".join(missing)
        )


def check_database(url: str) -> None:
    """The database URL's dialect has SQLAlchemy and its driver installed."""
    require("sqlalchemy", "db", "a database")
    require("alembic", "db", "a database")
    dialect = url.partition("://")[0].partition("+")[0]
    module, extra = DRIVERS.get(dialect, ("", ""))
    if module:
        require(module, extra, f"a {dialect} database")
