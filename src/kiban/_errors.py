"""Errors as RFC 9457 problem details.

Every error response a kiban service sends, whether raised by a handler, produced by
validation or routing, or caused by a bug, is ``application/problem+json`` carrying the
request's trace id, so a user's report leads straight to the logs. Bugs are logged with
their traceback and answered with a bare 500: no traceback ever reaches the client.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Mapping, Sequence
from http import HTTPStatus
from typing import Any

import orjson
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from kiban import _log as log
from kiban import _propagation as propagation
from kiban import _routes as routes
from kiban._config import Settings
from kiban._occasional import Occasional

__all__ = ["PROBLEM_JSON", "Problem", "answer_escaped", "install", "problem_response"]

PROBLEM_JSON = "application/problem+json"


class Problem(Exception):
    """Raise to answer with a problem+json response: ``raise Problem(409, "email taken")``."""

    def __init__(
        self,
        status: int,
        detail: str | None = None,
        *,
        title: str | None = None,
        type: str = "about:blank",
        headers: Mapping[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        super().__init__(detail or title or HTTPStatus(status).phrase)
        self.status = status
        self.detail = detail
        self.title = title
        self.type = type
        self.headers = dict(headers or {})
        self.extensions = extensions


def problem_body(
    status: int,
    detail: str | None = None,
    *,
    title: str | None = None,
    type: str = "about:blank",
    **extensions: Any,
) -> bytes:
    """The problem+json document; ``status`` always equals the HTTP status."""
    body: dict[str, Any] = {
        "type": type,
        "title": title or _phrase(status),
        "status": status,
    }
    if detail:
        body["detail"] = detail
    context = propagation.current()
    if context is not None:
        body["trace_id"] = context.trace_id
    body.update(extensions)
    return orjson.dumps(body)


def problem_response(
    status: int,
    detail: str | None = None,
    *,
    headers: Mapping[str, str] | None = None,
    **fields: Any,
) -> Response:
    return Response(
        problem_body(status, detail, **fields), status, headers=headers, media_type=PROBLEM_JSON
    )


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _pointer(loc: Sequence[int | str]) -> str:
    """A JSON pointer (RFC 6901) into the request part that failed validation."""
    parts = [str(part).replace("~", "~0").replace("/", "~1") for part in loc]
    return "#/" + "/".join(parts)


async def _on_problem(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, Problem)
    return problem_response(
        exc.status,
        exc.detail,
        headers=exc.headers,
        title=exc.title,
        type=exc.type,
        **exc.extensions,
    )


def _allowed_methods(request: Request, headers: Mapping[str, str]) -> str | None:
    """Every method served at this path: the refusing route's, and every other route's.

    Starlette's 405 names only the first route that matched the path, so with
    ``GET /items`` and ``POST /items`` declared apart, ``DELETE /items`` would say
    ``Allow: GET``. RFC 9110 wants them all.
    """
    methods = routes.methods_at(getattr(request.app, "routes", ()), request.scope["path"])
    for name, value in headers.items():
        if name.lower() == "allow":
            methods |= {method.strip() for method in value.split(",") if method.strip()}
    return ", ".join(sorted(methods)) if methods else None


async def _on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    detail = exc.detail if exc.detail != _phrase(exc.status_code) else None
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        allowed = _allowed_methods(request, headers)
        if allowed:
            headers = {name: value for name, value in headers.items() if name.lower() != "allow"}
            headers["allow"] = allowed
    return problem_response(exc.status_code, detail, headers=headers)


async def _on_validation_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"detail": error.get("msg", "invalid"), "pointer": _pointer(error.get("loc", ()))}
        for error in exc.errors()
    ]
    return problem_response(
        422, "The request is not valid.", title="Unprocessable Content", errors=errors
    )


#: While a dependency is down every request fails on it: one line a second says so (the
#: access lines, 503 or 504, have each request), not a flood when the logs are read.
TIMED_OUT = Occasional("dependency timed out")
UNAVAILABLE = Occasional("dependency unavailable")


async def _on_downstream_timeout(request: Request, exc: Exception) -> Response:
    TIMED_OUT.warning(path=request.url.path, error_type=type(exc).__name__)
    return problem_response(504, "A dependency did not answer in time.")


async def _on_unavailable(request: Request, exc: Exception) -> Response:
    UNAVAILABLE.warning(path=request.url.path, error_type=type(exc).__name__)
    return problem_response(
        503, "A dependency is unavailable; try again later.", headers={"retry-after": "1"}
    )


def install(app: FastAPI) -> None:
    """Make every error the app answers with a problem+json response.

    A handler the app registered itself for the same exception is kept: kiban only
    replaces FastAPI's defaults.
    """
    _handle(app, ConnectionError, _on_unavailable)
    install_dependency_errors(app)
    _handle(app, Problem, _on_problem)
    _handle(app, HTTPException, _on_http_exception)
    _handle(app, RequestValidationError, _on_validation_error)


def _handle(app: FastAPI, exception: type[Exception], handler: Any) -> None:
    """Register ``handler`` unless the app has its own for ``exception``."""
    found = app.exception_handlers.get(exception)
    if found is None or getattr(found, "__module__", None) in _DEFAULTS:
        app.add_exception_handler(exception, handler)


#: Whose handlers kiban may replace: FastAPI's defaults, and kiban's own.
_DEFAULTS = frozenset({"fastapi.exception_handlers", __name__})


_PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": "An RFC 9457 problem details document.",
    "type": "object",
    "properties": {
        "type": {"type": "string", "default": "about:blank"},
        "title": {"type": "string"},
        "status": {"type": "integer", "minimum": 100, "maximum": 599},
        "detail": {"type": "string"},
        "trace_id": {"type": "string"},
    },
    "required": ["type", "title", "status"],
    "additionalProperties": True,
}
_VALIDATION_PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "ValidationProblem",
    "allOf": [
        {"$ref": "#/components/schemas/Problem"},
        {
            "type": "object",
            "properties": {
                "errors": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "detail": {"type": "string"},
                            "pointer": {"type": "string"},
                        },
                        "required": ["detail", "pointer"],
                    },
                }
            },
        },
    ],
}


def _problem_response(description: str, schema: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {PROBLEM_JSON: {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }


def document(openapi: dict[str, Any]) -> dict[str, Any]:
    """Describe kiban's error responses in an OpenAPI document, in place.

    Validation errors are 422 problem+json (not FastAPI's ``HTTPValidationError``), and
    every operation may answer any other error as a problem (``default``).
    """
    schemas = openapi.setdefault("components", {}).setdefault("schemas", {})
    schemas["Problem"] = _PROBLEM_SCHEMA
    schemas["ValidationProblem"] = _VALIDATION_PROBLEM_SCHEMA
    for path_item in openapi.get("paths", {}).values():
        for operation in path_item.values():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            responses = operation["responses"]
            if "422" in responses:
                responses["422"] = _problem_response("Validation Error", "ValidationProblem")
            responses.setdefault("default", _problem_response("Error", "Problem"))
    text = orjson.dumps(openapi)
    for unused in ("HTTPValidationError", "ValidationError"):
        if f"#/components/schemas/{unused}".encode() not in text:
            schemas.pop(unused, None)
    return openapi


def install_dependency_errors(app: FastAPI) -> None:
    """A database or service that is down or slow is an outage to report, not a bug.

    SQLAlchemy's and httpx's errors map to 503 (504 for a timeout). Registered for the
    libraries already imported, and again when the service makes an engine or a client,
    so a service that uses neither never loads them.
    """
    for unavailable in dependency_errors():
        _handle(app, unavailable, _on_unavailable)
    if "httpx" in sys.modules:
        import httpx

        _handle(app, httpx.TimeoutException, _on_downstream_timeout)


def init_sentry(settings: Settings) -> None:
    """Report unhandled exceptions to Sentry when ``SENTRY_DSN`` is set.

    Only kiban reports, from its request path (``answer_escaped``): the SDK's automatic
    integrations are off so nothing is patched into the app and nothing is reported
    twice or for a 4xx.
    """
    if settings.sentry_dsn is None:
        return
    import sentry_sdk

    sentry_sdk.init(
        dsn=settings.sentry_dsn.get_secret_value(),
        release=f"{settings.service_name}@{settings.service_version}",
        environment=settings.sentry_environment,
        server_name=settings.service_name,
        default_integrations=False,
        auto_enabling_integrations=False,
        send_default_pii=False,
        traces_sample_rate=0.0,
    )


def flush_reports(settings: Settings) -> None:
    """Send the error reports still queued (at shutdown), within the cleanup timeout."""
    if sentry_enabled():
        import sentry_sdk

        sentry_sdk.flush(timeout=settings.shutdown_cleanup_timeout)


def sentry_enabled() -> bool:
    module = sys.modules.get("sentry_sdk")
    return module is not None and bool(module.is_initialized())


def dependency_errors() -> tuple[type[Exception], ...]:
    """The exceptions that mean a dependency is down, of the libraries loaded now."""
    found: list[type[Exception]] = []
    if "sqlalchemy" in sys.modules:
        from sqlalchemy import exc

        found += [exc.OperationalError, exc.InterfaceError, exc.TimeoutError]
    if "httpx" in sys.modules:
        import httpx

        found.append(httpx.TransportError)
    if "redis" in sys.modules:
        from redis import exceptions

        found += [exceptions.ConnectionError, exceptions.TimeoutError]
    return tuple(found)


def report(exc: BaseException, scope: Scope) -> None:
    """Send a bug to Sentry (when it is on) with the request's ids and route."""
    _report(exc, scope)


def _report(exc: BaseException, scope: Scope) -> None:
    if not sentry_enabled():
        return
    import sentry_sdk

    context = propagation.current()
    with sentry_sdk.new_scope() as sentry_scope:
        route = routes.template(scope)
        sentry_scope.set_tag("http.method", scope["method"])
        sentry_scope.set_tag("http.route", route or "unmatched")
        if context is not None:
            sentry_scope.set_tag("trace_id", context.trace_id)
            sentry_scope.set_tag("request_id", context.request_id)
            if context.uid:
                sentry_scope.set_user({"id": context.uid})
                sentry_scope.set_tag("uid", context.uid)
        sentry_sdk.capture_exception(exc)


async def answer_escaped(
    exc: Exception,
    scope: Scope,
    receive: Receive,
    send: Send,
    started: bool,
    handler: Callable[[Request, Exception], Any] | None = None,
) -> None:
    """Answer for an exception that escaped the app's own exception handlers.

    A Problem or HTTPException raised outside them (by kiban's request path) gets its
    problem response; anything else is a bug: reported, logged with its traceback and
    answered with a bare 500 problem, or by ``handler``, the app's own handler for
    ``Exception`` (``@app.exception_handler(Exception)``), as Starlette would call it.
    Called from an ``except`` block; once the response has started nothing more can
    be sent, so a problem is re-raised and a bug only logged.
    """
    if isinstance(exc, HTTPException | Problem):
        if started:
            raise exc
        handler = _on_problem if isinstance(exc, Problem) else _on_http_exception
        response = await handler(Request(scope), exc)
        await response(scope, receive, send)
        return
    _report(exc, scope)
    log.exception(
        "unhandled exception",
        method=scope["method"],
        path=scope["path"],
        response_started=started,
    )
    if started:
        return
    if handler is None:
        await problem_response(500)(scope, receive, send)
        return
    request = Request(scope, receive)
    if inspect.iscoroutinefunction(handler):
        response = await handler(request, exc)
    else:
        response = await run_in_threadpool(handler, request, exc)
    if response is not None:
        await response(scope, receive, send)
