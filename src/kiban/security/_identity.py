"""Who the current request is: the principal a scheme accepted, for handlers to check.

A route's requirement says who may call it; ``owns`` answers the next question, whose
data they may touch (object-level authorization).
"""

from __future__ import annotations

from contextvars import ContextVar

from kiban.security._schemes import Principal

__all__ = ["owns", "principal"]

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


def authenticated(who: Principal | None) -> None:
    """Record the request's principal (None on a public route)."""
    _principal.set(who)
