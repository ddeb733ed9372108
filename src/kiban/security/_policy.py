"""Declarative security: requirements at API, service (router) and method (route) level.

``Security(jwt, scopes=["admin"])`` and ``NoSecurity()`` go in FastAPI's
``dependencies=[...]`` of a router or a route; the API default is given to
``kiban.Service(app, security=...)``. The narrowest level replaces the wider ones
(Goa's rule), which plain FastAPI dependencies cannot do since an inherited dependency
cannot be removed. So kiban resolves every route once, before serving: each route gets
exactly one requirement, the narrowest declared, and only that one is enforced; the
others are inert declarations. A route with no requirement anywhere is a start-up
error, so nothing is public by accident. The OpenAPI document shows the result.

Several schemes in one requirement mean any of them; a scheme's scopes must all be
held. Missing credentials give 401 with a WWW-Authenticate challenge per scheme, bad
ones 401, valid ones without a scope 403 naming the scope. Every failure is logged
(scheme, reason, route, client: never the credential) and counted. A client IP with
too many bad credentials in a window (``AUTH_FAILURE_LIMIT``) gets 429 before its next
credential is even looked at: guessing keys and passwords is throttled.

A credential that a scheme accepts becomes the request's identity (``identify``): the
uid or API client in the context, the logs and the headers sent downstream.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import fastapi.routing
from fastapi import FastAPI, Request, params
from starlette.requests import HTTPConnection
from starlette.routing import Route
from starlette.types import Scope

from kiban import _log as log
from kiban import _propagation as propagation
from kiban import _routes as routes
from kiban._errors import Problem
from kiban._ratelimit import Limiter, RateLimit
from kiban._telemetry import Telemetry
from kiban.security._schemes import AuthError, Principal, Scheme

__all__ = [
    "Alternative",
    "NoSecurity",
    "Policy",
    "Requirement",
    "Security",
    "SecurityConfigError",
    "Unlimited",
    "owns",
    "principal",
]

#: The rate-limit Decision of an admitted request, whose headers every answer carries.
RATE_DECISION = "kiban.ratelimit.decision"
#: The Resolved requirement the request path already enforced for this request.
ADMITTED = "kiban.security.admitted"
_principal: ContextVar[Principal | None] = ContextVar("kiban_principal", default=None)


def principal() -> Principal | None:
    """Who the current request was authenticated as (None on public routes)."""
    return _principal.get()


def owns(owner: object, *, or_scope: str | None = None) -> bool:
    """Whether the request's principal may act on a resource belonging to ``owner``.

    Object-level authorization (OWASP API1): a route's requirement says who may call
    it, not whose data they may touch. True when the principal's subject is ``owner``
    (compared as text: ``owns(order.member_id)``), or it holds ``or_scope`` (an admin
    or a service acting for anyone). Answer a resource someone does not own as 404, so
    its existence is not disclosed either.
    """
    who = _principal.get()
    if who is None:
        return False
    return who.subject == str(owner) or (or_scope is not None and or_scope in who.scopes)


class SecurityConfigError(Exception):
    """The security declarations leave a route without a requirement, or are ambiguous."""


@dataclass(frozen=True)
class Alternative:
    scheme: Scheme
    scopes: frozenset[str] = frozenset()


class Requirement:
    """One level's declaration: any of ``alternatives``; none at all means public."""

    def __init__(self, alternatives: Sequence[Alternative], rate_limit: RateLimit | None = None):
        self.alternatives = tuple(alternatives)
        self.rate_limit = rate_limit
        self.public = not self.alternatives

    def __repr__(self) -> str:
        if self.public:
            return "NoSecurity()"
        parts = [
            f"{a.scheme.name}{sorted(a.scopes) if a.scopes else ''}" for a in self.alternatives
        ]
        return f"Security({' | '.join(parts)})"

    async def __call__(self, request: HTTPConnection) -> None:
        """Enforce, when this is the route's resolved requirement and not yet enforced.

        An ``HTTPConnection``, so that the same marker serves HTTP and websocket routes.
        """
        policy: Policy = request.app.state.kiban.policy
        scope = request.scope
        resolved = policy.for_route(request.app, scope.get("route"))
        if resolved.requirement is self and scope.get(ADMITTED) != resolved:
            await policy.admit(resolved, request, routes.template(scope) or request.url.path)


def Security(*schemes: Scheme | Alternative, scopes: Iterable[str] = ()) -> Any:
    """Require any of ``schemes``; bare schemes must hold every scope in ``scopes``."""
    if not schemes:
        raise ValueError("Security() needs at least one scheme; use NoSecurity() for public")
    required = frozenset(scopes)
    alternatives = [
        item if isinstance(item, Alternative) else Alternative(item, required) for item in schemes
    ]
    return params.Depends(Requirement(alternatives))


def NoSecurity() -> Any:
    """Declare a route (or router, or API) public, explicitly."""
    return params.Depends(Requirement(()))


def RateLimited(limit: str, key: str = "subject", name: str | None = None) -> Any:
    """Declare a rate limit at router or route level: ``RateLimited("10/second")``."""
    return params.Depends(_RateLimitMarker(RateLimit(limit, key, name or limit)))  # type: ignore[arg-type]


def Unlimited() -> Any:
    """Declare a route or router free of the API's rate limit (probes, scrapes)."""
    return params.Depends(_RateLimitMarker(None))


class _RateLimitMarker:
    """A rate-limit declaration; enforced with the route's security requirement."""

    def __init__(self, rate: RateLimit | None) -> None:
        self.rate = rate

    async def __call__(self) -> None:
        return None


def requirement_of(depends: Any) -> Requirement:
    """The Requirement inside what Security()/NoSecurity() returned."""
    dependency = getattr(depends, "dependency", depends)
    if not isinstance(dependency, Requirement):
        raise TypeError(f"expected Security(...) or NoSecurity(), got {depends!r}")
    return dependency


@dataclass(frozen=True)
class Resolved:
    requirement: Requirement
    rate_limit: RateLimit | None


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


def _rate_key(
    rate: RateLimit,
    who: Principal | None,
    client: bool,
    context: propagation.RequestContext | None,
) -> str:
    """What a request is counted under: its API client, its principal, or its user IP.

    Only what kiban verified or trusts counts: the principal a scheme accepted
    (``client`` when an API key proved it), and the user IP, which is the socket peer
    unless a trusted proxy said otherwise. No header a client types changes the key.
    """
    if rate.key == "api_client" and who is not None and client:
        return f"client:{who.subject}"
    if rate.key != "ip" and who is not None:
        return f"{who.scheme}:{who.subject}"
    return _ip_key(context)


def _ip_key(context: propagation.RequestContext | None) -> str:
    return f"ip:{context.user_ip if context else 'unknown'}"


def _literal_prefix(path: str) -> str:
    return path.split("{", 1)[0]


class Policy:
    """The resolved requirement of every route, and their enforcement."""

    def __init__(
        self,
        default: Any = None,
        rate_limit: RateLimit | None = None,
        limiter: Limiter | None = None,
        telemetry: Telemetry | None = None,
        auth_failures: RateLimit | None = None,
    ) -> None:
        self.default = requirement_of(default) if default is not None else None
        #: Bad credentials allowed per client IP before 429 (None: no throttle).
        self.auth_failures = auth_failures
        self.default_rate = rate_limit
        self.limiter = limiter or Limiter()
        self.telemetry = telemetry
        self.table: dict[int, Resolved] = {}
        self.operations: dict[tuple[str, str], Resolved] = {}
        self.websockets: list[tuple[re.Pattern[str], str, Resolved]] = []
        #: Query parameters that carry a credential (``APIKey(location="query")``).
        self.query_credentials: set[str] = set()
        self._literal: dict[str, list[_Entry]] = {}
        self._patterns: list[_Entry] = []
        self._resolved_for: int | None = None

    def api_dependencies(self) -> list[Any]:
        """What to add to the app's own dependencies so every route sees the API default."""
        return [params.Depends(self.default)] if self.default is not None else []

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
            rates = [d.rate for d in declared if isinstance(d, _RateLimitMarker)]
            if not requirements:
                methods = ["WEBSOCKET"] if websocket else sorted(route.methods or [])
                unsecured.append(f"{methods} {route.path_format}")
                continue
            resolved = Resolved(requirements[-1], rates[-1] if rates else self.default_rate)
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

    async def before_routing(
        self, app: FastAPI, scope: Scope, context: propagation.RequestContext | None = None
    ) -> None:
        """Resolve if routes changed (fail closed), then enforce an exclusive route's requirement.

        Start-up resolves; resolving here covers an app served without a lifespan, or
        routes added later: no request is served while the routes' security is
        unresolved, and a bad declaration makes every request a 500, never public.
        Routes that are not exclusive are enforced after routing, by their markers.
        """
        if self._resolved_for != len(app.routes):
            self.resolve(app)
        entry = self._admission(scope)
        if entry is not None and entry.resolved is not None:
            await self.admit(entry.resolved, Request(scope), entry.path, context)

    async def admit_websocket(self, app: FastAPI, scope: Scope) -> None:
        """Enforce a websocket route's requirement before the app accepts the connection.

        Raises the problem a refused handshake would get; the caller closes the socket.
        """
        if self._resolved_for != len(app.routes):
            self.resolve(app)
        path = routes.route_path(scope)
        for regex, template, resolved in self.websockets:
            if regex.match(path):
                await self.admit(resolved, HTTPConnection(scope), template)
                return

    def _admission(self, scope: Scope) -> _Entry | None:
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

    async def admit(
        self,
        resolved: Resolved,
        request: HTTPConnection,
        path: str,
        context: propagation.RequestContext | None = None,
    ) -> None:
        """Authenticate and count the request against ``resolved``, or raise its problem.

        ``context`` is the request's, when the caller has it at hand.
        """
        scope = request.scope
        requirement = resolved.requirement
        if context is None:
            context = propagation.current()
        who, client = (
            (None, False)
            if requirement.public
            else await self._authenticate(requirement, request, path, context)
        )
        _principal.set(who)
        rate = resolved.rate_limit
        if rate is not None:
            key = _rate_key(rate, who, client, context)
            local = self.limiter.local
            decision = (
                local.hit(rate, key, time.time())
                if local is not None
                else await self.limiter.hit(rate, key)
            )
            if decision is not None:
                if not decision.allowed:
                    if self.telemetry is not None:
                        self.telemetry.rate_limited.add(1, {"http.route": path})
                    raise Problem(
                        429, "Too many requests; retry later.", headers=decision.headers()
                    )
                # The request path adds them to the response, whatever the handler returns.
                scope[RATE_DECISION] = decision
        scope[ADMITTED] = resolved

    async def _authenticate(
        self,
        requirement: Requirement,
        request: HTTPConnection,
        path: str,
        context: propagation.RequestContext | None,
    ) -> tuple[Principal, bool]:
        """The principal, and whether it is an API client; or the problem to answer."""
        throttle = self.auth_failures
        if throttle is not None and not await self.limiter.allows(throttle, _ip_key(context)):
            self._failed("*", "throttled", path)
            raise Problem(
                429,
                "Too many failed authentications; retry later.",
                headers={"retry-after": str(throttle.expiry)},
            )
        failures: list[tuple[Scheme, str]] = []
        missing_scopes: list[str] = []
        for alternative in requirement.alternatives:
            scheme = alternative.scheme
            try:
                who = await scheme.authenticate(request)
            except AuthError as exc:
                failures.append((scheme, exc.reason))
                continue
            if who is None:
                continue
            scheme.identify(who)  # a verified principal, even if it lacks a scope
            if alternative.scopes <= who.scopes:
                return who, scheme.identifies == "client"
            missing_scopes.extend(alternative.scopes - who.scopes)
        if missing_scopes:
            self._failed(requirement.alternatives[0].scheme.name, "missing scope", path)
            raise Problem(
                403,
                f"Missing scope: {' '.join(sorted(set(missing_scopes)))}.",
                missing_scopes=sorted(set(missing_scopes)),
            )
        challenges = ", ".join(a.scheme.challenge() for a in requirement.alternatives)
        if failures:
            for failed, reason in failures:
                self._failed(failed.name, reason, path)
            if throttle is not None:
                await self.limiter.hit(throttle, _ip_key(context))
            raise Problem(
                401,
                f"Invalid credentials: {failures[0][1]}.",
                headers={"www-authenticate": challenges},
            )
        self._failed(
            ",".join(a.scheme.name for a in requirement.alternatives), "missing credentials", path
        )
        raise Problem(401, "Credentials are required.", headers={"www-authenticate": challenges})

    def _failed(self, scheme: str, reason: str, route: str) -> None:
        context = propagation.current()
        log.warning(
            "authentication failed",
            scheme=scheme,
            reason=reason,
            route=route,
            client=context.user_ip if context else None,
        )
        if self.telemetry is not None:
            self.telemetry.auth_failures.add(1, {"scheme": scheme, "reason": reason})

    def document(self, openapi: dict[str, Any]) -> dict[str, Any]:
        """Write the resolved requirements into an OpenAPI document, in place."""
        schemes: dict[str, Any] = {}
        for (path, method), resolved in self.operations.items():
            operation = openapi.get("paths", {}).get(path, {}).get(method)
            if operation is None:
                continue
            requirement = resolved.requirement
            operation["security"] = [
                {a.scheme.name: sorted(a.scopes)} for a in requirement.alternatives
            ]
            for alternative in requirement.alternatives:
                schemes[alternative.scheme.name] = alternative.scheme.openapi()
            if not requirement.public:
                responses = operation.setdefault("responses", {})
                for status, description in (("401", "Unauthorized"), ("403", "Forbidden")):
                    responses.setdefault(
                        status,
                        {
                            "description": description,
                            "content": {
                                "application/problem+json": {
                                    "schema": {"$ref": "#/components/schemas/Problem"}
                                }
                            },
                        },
                    )
            if resolved.rate_limit is not None:
                operation.setdefault("responses", {}).setdefault(
                    "429",
                    {
                        "description": "Too Many Requests",
                        "content": {
                            "application/problem+json": {
                                "schema": {"$ref": "#/components/schemas/Problem"}
                            }
                        },
                    },
                )
        if schemes:
            openapi.setdefault("components", {})["securitySchemes"] = schemes
        return openapi
