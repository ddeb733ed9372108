"""kiban: the production foundation for Python microservices.

This module is kiban's public surface (with ``kiban.security`` and, for services with
a database, ``kiban.database``): everything else lives in private modules whose names
may change in any release. ``tests/test_exported_members.py`` locks it.
"""

from kiban import _log as log
from kiban._accesslog import FIELDS as ACCESS_LOG_FIELDS
from kiban._app import Service
from kiban._client import PropagatingTransport
from kiban._config import ConfigError, HeaderNames, Settings, load
from kiban._errors import Problem
from kiban._health import HTTPPinger, Pinger, RedisPinger, SQLPinger
from kiban._propagation import RequestContext, current, outbound_headers
from kiban._ratelimit import RateLimit
from kiban._server import run
from kiban._telemetry import meter, tracer
from kiban.security._declare import NoTimeout, Timeout

__all__ = [
    "ACCESS_LOG_FIELDS",
    "ConfigError",
    "HTTPPinger",
    "HeaderNames",
    "NoTimeout",
    "Pinger",
    "Problem",
    "PropagatingTransport",
    "RateLimit",
    "RedisPinger",
    "RequestContext",
    "SQLPinger",
    "Service",
    "Settings",
    "Timeout",
    "current",
    "load",
    "log",
    "meter",
    "outbound_headers",
    "run",
    "tracer",
]
__version__ = "0.1.0"
