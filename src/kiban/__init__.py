"""kiban: the production foundation for Python microservices."""

from kiban import log
from kiban.app import Service
from kiban.config import ConfigError, HeaderNames, Settings, load
from kiban.errors import Problem
from kiban.health import HTTPPinger, Pinger, RedisPinger, SQLPinger
from kiban.propagation import RequestContext, current
from kiban.server import run
from kiban.telemetry import meter, tracer

__all__ = [
    "ConfigError",
    "HTTPPinger",
    "HeaderNames",
    "Pinger",
    "Problem",
    "RedisPinger",
    "RequestContext",
    "SQLPinger",
    "Service",
    "Settings",
    "current",
    "load",
    "log",
    "meter",
    "run",
    "tracer",
]
__version__ = "0.1.0"
