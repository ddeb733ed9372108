"""The route template a request matched, for logs, metrics, spans and error reports."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import fastapi.routing
from starlette.types import Scope

__all__ = ["effective", "methods_at", "route_path", "template"]


def template(scope: Scope) -> str | None:
    """``/members/{member_id}`` for ``/members/7``; None before routing or when unmatched.

    Uses the path format, so a typed parameter (``{member_id:int}``) reads as OpenAPI
    writes it.
    """
    route = scope.get("route")
    if route is None:
        return None
    found = getattr(route, "path_format", None) or getattr(route, "path", None)
    return found if isinstance(found, str) else None


def route_path(scope: Scope) -> str:
    """The path routes match: the request's path without the app's ``root_path``.

    As Starlette's router computes it for a mounted or proxied app (ASGI: ``path``
    includes ``root_path``).
    """
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if not root or not path.startswith(root):
        return path
    if path == root:
        return ""
    return path[len(root) :] if path[len(root)] == "/" else path


def effective(routes: Any) -> Iterator[tuple[Any, Any]]:
    """(route as seen in ``scope["route"]``, the route with its full prefix and chain).

    FastAPI versions that include routers lazily expose the effective routes through
    ``fastapi.routing.iter_route_contexts``; older ones copy routes when including.
    """
    iterate = getattr(fastapi.routing, "iter_route_contexts", None)
    if iterate is not None:
        for context in iterate(routes):
            yield context.original_route, context
    else:
        for route in routes:
            yield route, route


def methods_at(routes: Any, path: str) -> set[str]:
    """Every method some route serves at ``path``."""
    found: set[str] = set()
    for _, route in effective(routes):
        regex = getattr(route, "path_regex", None)
        if regex is not None and regex.match(path):
            found |= set(getattr(route, "methods", None) or ())
    return found
