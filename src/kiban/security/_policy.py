"""Enforcing security and rate limits: every request meets its route's one requirement.

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

from collections.abc import Callable
from functools import partial
from typing import Any

from fastapi import FastAPI, Request, params
from starlette.requests import HTTPConnection
from starlette.types import Scope

from kiban import _log as log
from kiban import _propagation as propagation
from kiban import _routes as routes
from kiban._errors import Problem
from kiban._occasional import Occasional
from kiban._ratelimit import Limiter, RateLimit
from kiban._telemetry import Telemetry
from kiban.security._declare import ADMITTED, Requirement, requirement_of
from kiban.security._identity import authenticated
from kiban.security._openapi import document
from kiban.security._routing import Resolved, RouteTable
from kiban.security._schemes import AuthError, Principal, Scheme

__all__ = ["RATE_DECISION", "Policy"]

#: The rate-limit Decision of an admitted request, whose headers every answer carries.
RATE_DECISION = "kiban.ratelimit.decision"


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


class Policy:
    """The service's security: the route table, and enforcement of what it resolved."""

    def __init__(
        self,
        default: params.Depends | None = None,
        rate_limit: RateLimit | None = None,
        limiter: Limiter | None = None,
        telemetry: Telemetry | None = None,
        auth_failures: RateLimit | None = None,
        handler_timeout: float | None = None,
    ) -> None:
        self.default = requirement_of(default) if default is not None else None
        #: Bad credentials allowed per client IP before 429 (None: no throttle).
        self.auth_failures = auth_failures
        self.limiter = limiter or Limiter()
        self.telemetry = telemetry
        self.routes = RouteTable(rate_limit, handler_timeout)
        #: Requests refused by the authentication throttle: logged occasionally.
        self.throttled = Occasional("authentication failed")

    @property
    def query_credentials(self) -> set[str]:
        """Query parameters that carry a credential; the access log redacts them."""
        return self.routes.query_credentials

    def api_dependencies(self) -> list[Any]:
        """What to add to the app's own dependencies so every route sees the API default."""
        return [params.Depends(self.default)] if self.default is not None else []

    def resolve(self, app: FastAPI) -> None:
        """Give every API route its narrowest requirement; refuse routes left without one."""
        self.routes.resolve(app)

    def for_route(self, app: FastAPI, route: Any) -> Resolved:
        """The resolved requirement of the route FastAPI matched; never none (fail closed)."""
        return self.routes.for_route(app, route)

    async def before_routing(
        self, app: FastAPI, scope: Scope, context: propagation.RequestContext | None = None
    ) -> None:
        """Resolve if routes changed (fail closed), then enforce an exclusive route's requirement.

        Start-up resolves; resolving here covers an app served without a lifespan, or
        routes added later: no request is served while the routes' security is
        unresolved, and a bad declaration makes every request a 500, never public.
        Routes that are not exclusive are enforced after routing, by their markers.
        """
        self.routes.current(app)
        entry = self.routes.admission(scope)
        if entry is not None and entry.resolved is not None:
            await self.admit(entry.resolved, Request(scope), entry.path, context)

    async def admit_websocket(self, app: FastAPI, scope: Scope) -> None:
        """Enforce a websocket route's requirement before the app accepts the connection.

        Raises the problem a refused handshake would get; the caller closes the socket.
        """
        self.routes.current(app)
        path = routes.route_path(scope)
        for regex, template, resolved in self.routes.websockets:
            if regex.match(path):
                await self.admit(resolved, HTTPConnection(scope), template)
                return

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
        authenticated(who)
        rate = resolved.rate_limit
        if rate is not None:
            key = _rate_key(rate, who, client, context)
            local = self.limiter.local
            decision = (
                local.hit(rate, key, local.clock())
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
            # Counted every time, logged at most once a second: a guesser past the
            # limit, whatever it sends, cannot flood the logs.
            self._failed("*", "throttled", path, self.throttled.warning)
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

    def _failed(
        self, scheme: str, reason: str, route: str, warn: Callable[..., None] | None = None
    ) -> None:
        """Log (with ``warn``, else a line each time) and count a refused authentication."""
        context = propagation.current()
        (warn or partial(log.warning, "authentication failed"))(
            scheme=scheme,
            reason=reason,
            route=route,
            client=context.user_ip if context else None,
        )
        if self.telemetry is not None:
            self.telemetry.auth_failures.add(1, {"scheme": scheme, "reason": reason})

    def document(self, openapi: dict[str, Any]) -> dict[str, Any]:
        """Write the resolved requirements into an OpenAPI document, in place."""
        return document(openapi, self.routes.operations)
