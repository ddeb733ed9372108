"""Every route's one requirement: the narrowest declared, resolved once before serving.

The narrowest level replaces the wider ones (Goa's rule), which plain FastAPI
dependencies cannot do since an inherited dependency cannot be removed. A route with no
requirement anywhere is a start-up error, so nothing is public by accident. The table
also tells the request path which requirement a request will meet before FastAPI routes
it, when only one could apply.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import fastapi.routing
from fastapi import FastAPI
from starlette.routing import Route
from starlette.types import Scope

from kiban import _routes as routes
from kiban._ratelimit import RateLimit
from kiban.security._declare import (
    RateLimitMarker,
    Requirement,
    SecurityConfigError,
    TimeoutMarker,
)

__all__ = ["Resolved", "RouteTable"]


@dataclass(frozen=True)
class Resolved:
    requirement: Requirement
    rate_limit: RateLimit | None
    #: Seconds the route's handler may take; None: no limit.
    timeout: float | None = None


@dataclass(frozen=True)
class _Entry:
    """A route as the request path sees it before routing."""

    regex: re.Pattern[str]
    methods: frozenset[str] | None
    resolved: Resolved | None
    path: str
    static: bool

    def overlaps(self, other: _Entry) -> bool:
        """Whether some request could match both (conservatively: when unsure, yes)."""
        if (
            self.methods is not None
            and other.methods is not None
            and not (self.methods & other.methods)
        ):
            return False
        if self.static:
            return other.regex.match(self.path) is not None
        if other.static:
            return self.regex.match(other.path) is not None
        mine, theirs = _literal_prefix(self.path), _literal_prefix(other.path)
        return mine.startswith(theirs) or theirs.startswith(mine)


def _literal_prefix(path: str) -> str:
    return path.split("{", 1)[0]


class RouteTable:
    """The resolved requirement of every route, by route and by what a request shows."""

    def __init__(
        self, default_rate: RateLimit | None = None, default_timeout: float | None = None
    ) -> None:
        self.default_rate = default_rate
        self.default_timeout = default_timeout
        self.table: dict[int, Resolved] = {}
        self.operations: dict[tuple[str, str], Resolved] = {}
        self.websockets: list[tuple[re.Pattern[str], str, Resolved]] = []
        #: Query parameters that carry a credential (``APIKey(location="query")``).
        self.query_credentials: set[str] = set()
        self._literal: dict[str, list[_Entry]] = {}
        self._patterns: list[_Entry] = []
        self._resolved_for: int | None = None

    def current(self, app: FastAPI) -> None:
        """Resolve again if routes were added since (fail closed: never serve unresolved)."""
        if self._resolved_for != len(app.routes):
            self.resolve(app)

    def resolve(self, app: FastAPI) -> None:
        """Give every API route its narrowest requirement; refuse routes left without one."""
        table: dict[int, Resolved] = {}
        operations: dict[tuple[str, str], Resolved] = {}
        unsecured = []
        websockets: list[tuple[re.Pattern[str], str, Resolved]] = []
        credentials: set[str] = set()
        for key, route in routes.effective(app.routes):
            dependencies = getattr(route, "dependencies", None)
            websocket = isinstance(key, fastapi.routing.APIWebSocketRoute)
            if dependencies is None or not (websocket or isinstance(key, fastapi.routing.APIRoute)):
                continue
            declared = [d.dependency for d in dependencies]
            requirements = [d for d in declared if isinstance(d, Requirement)]
            rates = [d.rate for d in declared if isinstance(d, RateLimitMarker)]
            timeouts = [d.seconds for d in declared if isinstance(d, TimeoutMarker)]
            if not requirements:
                methods = ["WEBSOCKET"] if websocket else sorted(route.methods or [])
                unsecured.append(f"{methods} {route.path_format}")
                continue
            resolved = Resolved(
                requirements[-1],
                rates[-1] if rates else self.default_rate,
                timeouts[-1] if timeouts else self.default_timeout,
            )
            for alternative in resolved.requirement.alternatives:
                credentials.update(alternative.scheme.query_credentials())
            if websocket:
                websockets.append((route.path_regex, route.path_format, resolved))
                table[id(key)] = resolved
                continue
            previous = table.get(id(key))
            if previous is not None and previous != resolved:
                raise SecurityConfigError(
                    f"{route.path_format} is included twice with different security"
                )
            table[id(key)] = resolved
            for method in route.methods or ():
                operations[(route.path_format, method.lower())] = resolved
        if unsecured:
            raise SecurityConfigError(
                "no security requirement for "
                + ", ".join(unsecured)
                + ": declare Security(...) or NoSecurity() on the route or its router, "
                "or give kiban.Service(app, security=...) before adding routes"
            )
        self.table = table
        self.operations = operations
        self.websockets = websockets
        # Updated in place: the access log holds this set and redacts what it names.
        self.query_credentials.clear()
        self.query_credentials.update(credentials)
        entries = self._entries(app)
        self._literal = {}
        for entry in entries:
            if entry.static:
                self._literal.setdefault(entry.path, []).append(entry)
        self._patterns = [entry for entry in entries if not entry.static]
        self._resolved_for = len(app.routes)

    def _entries(self, app: FastAPI) -> list[_Entry]:
        """Every route in routing order; the exclusive ones are enforced before routing.

        A route is exclusive when no other route with another requirement (or none,
        like a mount) could match one of its requests: then the request path knows the
        route's requirement from the path and method alone, and enforces it before
        FastAPI routes, solves and validates anything; its marker dependency then finds
        the request admitted and does nothing. Other routes are enforced by their
        markers, as FastAPI dependencies.
        """
        found: list[tuple[_Entry, Any]] = []
        opaque = False  # a route matched by something other than its path: trust nothing
        for key, route in routes.effective(app.routes):
            regex = getattr(route, "path_regex", None)
            path = getattr(route, "path_format", None) or getattr(route, "path", None)
            if regex is None or not isinstance(path, str):
                opaque = True
                continue
            methods = getattr(route, "methods", None)
            entry = _Entry(
                regex,
                frozenset(methods) if methods else None,
                self.table.get(id(key)) if isinstance(key, fastapi.routing.APIRoute) else None,
                path,
                # Only plain routes match exactly their path; mounts and others, a prefix.
                isinstance(key, Route) and "{" not in path,
            )
            found.append((entry, route))
        entries = []
        for entry, _ in found:
            exclusive = (
                not opaque
                and entry.resolved is not None
                and not any(
                    other is not entry
                    and other.resolved != entry.resolved
                    and entry.overlaps(other)
                    for other, _ in found
                )
            )
            entries.append(entry if exclusive else dataclasses.replace(entry, resolved=None))
        return entries

    def admission(self, scope: Scope) -> _Entry | None:
        """The exclusive route that will serve this request, if its route is exclusive.

        Literal paths are looked up first: an exclusive route shares its requests with
        no route of another requirement, so which of several matches FastAPI picks
        does not change the answer, and a non-exclusive one answers None either way.
        """
        path = routes.route_path(scope)
        method = scope["method"]
        literal = self._literal.get(path)
        if literal is not None:
            for entry in literal:
                if entry.methods is None or method in entry.methods:
                    return entry if entry.resolved is not None else None
        for entry in self._patterns:
            if entry.regex.match(path) and (entry.methods is None or method in entry.methods):
                return entry if entry.resolved is not None else None
        return None

    def for_route(self, app: FastAPI, route: Any) -> Resolved:
        """The resolved requirement of the route FastAPI matched; never none (fail closed)."""
        found = self.table.get(id(route))
        if found is None:  # added after resolution (e.g. to an included router): resolve again
            self.resolve(app)
            found = self.table.get(id(route))
            if found is None:
                raise SecurityConfigError(f"no resolved security for {route!r}")
        return found
