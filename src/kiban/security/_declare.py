"""Security declarations: what a router or route says about who may call it.

``Security(jwt, scopes=["admin"])`` and ``NoSecurity()`` go in FastAPI's
``dependencies=[...]`` of a router or a route; the API default is given to
``kiban.Service(app, security=...)``. The declarations are inert values that
:mod:`kiban.security._routing` resolves to one requirement per route. Each is also a
FastAPI dependency, so a route whose requirement the request path could not enforce
before routing (see ``Policy.before_routing``) is enforced by its marker once routed.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import params
from starlette.requests import HTTPConnection

from kiban import _routes as routes
from kiban._ratelimit import KeyKind, RateLimit

if TYPE_CHECKING:
    from kiban.security._policy import Policy
    from kiban.security._schemes import Scheme

__all__ = [
    "ADMITTED",
    "HANDLER_TIMEOUT",
    "Alternative",
    "NoSecurity",
    "NoTimeout",
    "RateLimitMarker",
    "RateLimited",
    "Requirement",
    "Security",
    "SecurityConfigError",
    "Timeout",
    "TimeoutMarker",
    "Unlimited",
    "requirement_of",
]

#: The Resolved requirement the request path already enforced for this request.
ADMITTED = "kiban.security.admitted"
#: The request's handler timeout (an ``asyncio.Timeout``) and when it began (loop time).
HANDLER_TIMEOUT = "kiban.handler.timeout"


class SecurityConfigError(Exception):
    """The security declarations leave a route without a requirement, or are ambiguous."""


@dataclass(frozen=True)
class Alternative:
    scheme: "Scheme"
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

        The annotation is a real class, not a string (this module does not postpone
        annotations): FastAPI before 0.116 cannot resolve a string annotation of a
        callable instance, and would take ``request`` for a query parameter.

        An ``HTTPConnection``, so that the same marker serves HTTP and websocket routes.
        """
        policy: Policy = request.app.state.kiban.policy
        scope = request.scope
        resolved = policy.for_route(request.app, scope.get("route"))
        if resolved.requirement is not self:
            return
        limit = scope.get(HANDLER_TIMEOUT)
        if limit is not None:  # the route's own time, counted from the request's start
            timeout, began, default, cap = limit
            if resolved.timeout != default:
                when = None if resolved.timeout is None else began + resolved.timeout
                if cap is not None:  # never past the caller's budget
                    when = cap if when is None else min(when, cap)
                timeout.reschedule(when)
        if scope.get(ADMITTED) != resolved:
            await policy.admit(resolved, request, routes.template(scope) or request.url.path)


def Security(*schemes: "Scheme | Alternative", scopes: Iterable[str] = ()) -> params.Depends:
    """Require any of ``schemes``; bare schemes must hold every scope in ``scopes``."""
    if not schemes:
        raise ValueError("Security() needs at least one scheme; use NoSecurity() for public")
    required = frozenset(scopes)
    alternatives = [
        item if isinstance(item, Alternative) else Alternative(item, required) for item in schemes
    ]
    return params.Depends(Requirement(alternatives))


def NoSecurity() -> params.Depends:
    """Declare a route (or router, or API) public, explicitly."""
    return params.Depends(Requirement(()))


def RateLimited(limit: str, key: KeyKind = "subject", name: str | None = None) -> params.Depends:
    """Declare a rate limit at router or route level: ``RateLimited("10/second")``."""
    return params.Depends(RateLimitMarker(RateLimit(limit, key, name or limit)))


def Unlimited() -> params.Depends:
    """Declare a route or router free of the API's rate limit (probes, scrapes)."""
    return params.Depends(RateLimitMarker(None))


def Timeout(seconds: float) -> params.Depends:
    """Give a router's or route's handlers ``seconds`` (504 past them, the handler cancelled)."""
    if not seconds > 0:
        raise ValueError("Timeout() needs a positive number of seconds; use NoTimeout() for none")
    return params.Depends(TimeoutMarker(float(seconds)))


def NoTimeout() -> params.Depends:
    """Let a router's or route's handlers run as long as they need (streams, long polls)."""
    return params.Depends(TimeoutMarker(None))


class TimeoutMarker:
    """A handler-timeout declaration; applied with the route's security requirement."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds

    async def __call__(self) -> None:
        return None


class RateLimitMarker:
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
