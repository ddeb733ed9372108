"""Redaction: one list of what a secret's name looks like, for every place kiban writes.

The access log's query strings, the payload log's bodies, gRPC messages and the
dashboard's span and log attributes all replace the value of a name that contains one
of ``SECRET_PARTS`` (case-insensitive) with ``REDACTED``. One list, so a name redacted
in one place is redacted in all of them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["REDACTED", "SECRET_PARTS", "looks_secret", "redact_json", "redact_query"]

SECRET_PARTS = (
    "password",
    "passwd",
    "secret",
    "token",
    "authorization",
    "cookie",
    "api_key",
    "api-key",
    "apikey",
    "credential",
    "private_key",
)
REDACTED = "[REDACTED]"


def looks_secret(name: str) -> bool:
    """Whether ``name`` (a parameter, a field, an attribute) names a secret."""
    lowered = name.lower()
    return any(part in lowered for part in SECRET_PARTS)


def redact_json(value: Any) -> Any:
    """A copy of a JSON value with the values of secret-looking keys replaced."""
    if isinstance(value, dict):
        return {
            key: REDACTED if looks_secret(str(key)) else redact_json(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [redact_json(item) for item in value]
    return value


def redact_query(query: str, names: Iterable[str] = ()) -> str:
    """Replace the values of secret-looking parameters, and of ``names`` (exact, any
    case); leave the rest byte for byte."""
    if not query:
        return query
    exact = {name.lower() for name in names}
    parts = []
    for part in query.split("&"):
        key, sep, _ = part.partition("=")
        if sep and (key.lower() in exact or looks_secret(key)):
            part = f"{key}={REDACTED}"
        parts.append(part)
    return "&".join(parts)
