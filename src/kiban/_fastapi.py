"""The one place kiban touches a FastAPI internal, behind a version bound.

FastAPI (0.16x) instruments itself with OpenTelemetry when global providers are set,
as kiban sets them. Its switch is public only as ``FastAPI(telemetry={...})``, given
when the app is made; an app made without it would get a second server span per
request, operation spans and a second ``http.server.request.duration`` series next to
kiban's. So kiban turns it off on an app it is given. pyproject.toml bounds FastAPI
from above; ``tests/test_telemetry.py`` (one server span per request) pins the result.
An app made with ``FastAPI(telemetry={"tracing": False, "metrics": False,
"logs": False})`` needs nothing from here.
"""

from __future__ import annotations

from typing import Any

__all__ = ["disable_native_telemetry"]

_OFF = {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}


def disable_native_telemetry(app: Any) -> None:
    """Turn off FastAPI's own OpenTelemetry instrumentation on ``app``, where it has one."""
    config = getattr(app, "_telemetry", None)
    if isinstance(config, dict):
        config.update(_OFF)
