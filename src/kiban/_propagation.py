"""The request context: who and what a request is about, read once from its headers.

Inbound headers (trace id, uid, forwarded user-agent, user IP, X-Forwarded-For, API
client, internal identity token) and the peer address become one immutable
RequestContext in a contextvar. Logs, the access log and the outgoing client read it
from there, so handlers never pass these values by hand.

The headers are believed only from a trusted peer (``kiban._trust``); from any other
peer the context holds what kiban saw itself: the peer's address and user agent, fresh
ids, and no identity until a credential proves one (``identify``).
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Iterable
from contextvars import ContextVar, Token
from dataclasses import FrozenInstanceError
from typing import Literal, NamedTuple

from kiban._config import HeaderNames
from kiban._trust import TrustedPeers

__all__ = [
    "Inbound",
    "RequestContext",
    "current",
    "enter",
    "leave",
    "new_id",
    "outbound_headers",
]

_HEX32 = re.compile(r"[0-9a-f]{32}")
_TOKEN = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")
_MAX_VALUE = 512
_MAX_FORWARDED_FOR = 2048
_MAX_ID_TOKEN = 16 * 1024


class RequestContext(NamedTuple):
    """What kiban knows about the request being served. Immutable: one per request.

    A named tuple rather than a frozen dataclass: it is built on every request, and a
    tuple is made in one step where a frozen dataclass sets each field in turn.
    """

    trace_id: str
    request_id: str
    uid: str | None = None
    #: The end user's user agent: the forwarded one if an upstream sent it, else our peer's.
    user_agent: str | None = None
    #: The end user's IP: the forwarded one if an upstream sent it, else our peer's address.
    user_ip: str | None = None
    #: X-Forwarded-For as received (the chain of hops before ours).
    forwarded_for: str | None = None
    #: The address of the peer that connected to us.
    remote_addr: str | None = None
    api_client: str | None = None
    #: The gateway-issued internal identity token, forwarded to internal services only.
    id_token: str | None = None
    #: The request asked for debug logs (honoured only when debug is enabled).
    debug: bool = False

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{name}={value!r}"
            for name, value in zip(self._fields, self, strict=True)
            if name != "id_token"
        )
        return f"RequestContext({fields})"

    def __setattr__(self, name: str, value: object) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")


#: Sent on every response: an API's answers are never sniffed, framed or leak a referrer.
SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
)

_current: ContextVar[RequestContext | None] = ContextVar("kiban_request_context", default=None)


def current() -> RequestContext | None:
    """The context of the request being served, or None outside a request."""
    return _current.get()


#: When the request being served must be answered by (``time.monotonic()``), if its
#: caller gave a budget: ``x-request-timeout-ms`` from a trusted peer, or gRPC's own
#: deadline. kiban's clients give each call no more than what is left.
DEADLINE: ContextVar[float | None] = ContextVar("kiban_request_deadline", default=None)
#: The longest budget believed from a caller; more is no budget.
_MAX_BUDGET_MS = 3_600_000


def remaining() -> float | None:
    """Seconds left of the current request's budget (may be <= 0), or None: no budget."""
    deadline = DEADLINE.get()
    return None if deadline is None else deadline - time.monotonic()


def budget_seconds(value: str | None) -> float | None:
    """A ``x-request-timeout-ms`` value as seconds; None when absent or not a budget."""
    if value is None or not value.isdigit() or len(value) > 10:
        return None
    milliseconds = int(value)
    return milliseconds / 1000 if 0 <= milliseconds <= _MAX_BUDGET_MS else None


def identify(
    uid: str | None = None, api_client: str | None = None, id_token: str | None = None
) -> None:
    """Record what a verified credential proved: it replaces what a trusted peer claimed.

    Called by the security policy when a scheme accepts a request's credentials; a
    given value replaces the context's, an omitted one is left as it is.
    """
    context = _current.get()
    if context is None:
        return
    known = context._replace(
        uid=uid if uid is not None else context.uid,
        api_client=api_client if api_client is not None else context.api_client,
        id_token=id_token if id_token is not None else context.id_token,
    )
    if known != context:
        _current.set(known)


def new_id() -> str:
    """A fresh 128-bit id in W3C trace-id form (32 lowercase hex digits).

    From ``random`` like the OpenTelemetry SDK's ids: unique, not secret, and no
    system call per request.
    """
    return f"{random.getrandbits(128) or 1:032x}"


def _clean(value: str | None, limit: int = _MAX_VALUE) -> str | None:
    """Keep a header value only if it is short and free of control characters."""
    if value is None:
        return None
    value = value.strip()
    if not value or len(value) > limit or not value.isprintable():
        return None
    return value


def _trace_id(raw: str | None, traceparent: str | None) -> str:
    """W3C traceparent first (it also names the parent span), then the trace id header."""
    if traceparent:
        match = _TRACEPARENT.fullmatch(traceparent.strip().lower())
        if match and match.group(1) != "0" * 32:
            return match.group(1)
    if raw:
        candidate = raw.strip().lower().replace("-", "")
        if _HEX32.fullmatch(candidate) and candidate != "0" * 32:
            return candidate
    return new_id()


def _forwarded_for(value: str | None) -> str | None:
    """Keep X-Forwarded-For only if every hop in it is a plain address token."""
    value = _clean(value, _MAX_FORWARDED_FOR)
    if value is None:
        return None
    hops = [hop.strip() for hop in value.split(",")]
    if not all(_TOKEN.fullmatch(hop) for hop in hops):
        return None
    return ", ".join(hops)


def from_headers(
    headers: dict[str, str],
    names: HeaderNames,
    remote_addr: str | None,
    trusted: TrustedPeers | None = None,
) -> RequestContext:
    """Build the context from lower-cased request headers, dropping unsafe values.

    The propagation headers count only when ``remote_addr`` is in ``trusted``.
    """
    return Inbound(names, trusted=trusted).context(headers, remote_addr)


def _order(names: HeaderNames) -> tuple[str, ...]:
    """The header names ``_from_values`` reads, in its order."""
    return (
        names.trace_id,
        "traceparent",
        names.request_id,
        names.uid,
        names.user_agent,
        "user-agent",
        names.user_ip,
        names.forwarded_for,
        names.api_client,
        names.id_token,
        names.debug,
    )


def _untrusted(own_agent: str | None, remote_addr: str | None) -> RequestContext:
    """The context of a request from a peer that may assert nothing."""
    return RequestContext(
        new_id(),
        new_id(),
        None,
        _clean(own_agent) if own_agent is not None else None,
        remote_addr,
        None,
        remote_addr,
    )


def _from_values(
    values: Iterable[str | None], remote_addr: str | None, trusted: TrustedPeers
) -> RequestContext:
    """The context from a trusted peer's headers that ``_order`` names, each None when absent.

    Most are absent on most requests: each is cleaned only when present.
    """
    (
        trace,
        parent,
        request_id,
        uid,
        user_agent,
        own_agent,
        user_ip,
        forwarded_for,
        api_client,
        id_token,
        debug,
    ) = values
    if request_id is not None:
        request_id = _clean(request_id)
        if request_id is not None and not _TOKEN.fullmatch(request_id):
            request_id = None
    if user_agent is not None:
        user_agent = _clean(user_agent)
    if user_agent is None and own_agent is not None:
        user_agent = _clean(own_agent)
    if user_ip is not None:
        user_ip = _clean(user_ip)
        if user_ip is not None and not _TOKEN.fullmatch(user_ip):
            user_ip = None
    if forwarded_for is not None:
        forwarded_for = _forwarded_for(forwarded_for)
    if user_ip is None:
        user_ip = trusted.client(remote_addr, forwarded_for)
    return RequestContext(
        _trace_id(trace, parent) if trace or parent else new_id(),
        request_id or new_id(),
        _clean(uid) if uid is not None else None,
        user_agent,
        user_ip,
        forwarded_for,
        remote_addr,
        _clean(api_client) if api_client is not None else None,
        _clean(id_token, _MAX_ID_TOKEN) if id_token is not None else None,
        debug is not None and debug.strip() in ("1", "true"),
    )


def managed_headers(names: HeaderNames) -> frozenset[str]:
    """The headers (and gRPC metadata) kiban's clients set from the request context alone:
    what a caller sets for them is dropped, on HTTP and gRPC alike."""
    return frozenset(
        {
            names.trace_id,
            names.uid,
            names.user_agent,
            names.user_ip,
            names.forwarded_for,
            names.api_client,
            names.id_token,
            names.timeout,
            "traceparent",
            "tracestate",
        }
    )


def outbound_headers(
    context: RequestContext, names: HeaderNames, internal: bool = True
) -> dict[str, str]:
    """Headers that carry ``context`` to the next service, with this hop added to XFF.

    The identity token only goes to internal services.
    """
    headers = {names.trace_id: context.trace_id}
    hop = context.remote_addr
    if context.forwarded_for and hop:
        headers[names.forwarded_for] = f"{context.forwarded_for}, {hop}"
    elif context.forwarded_for or hop:
        headers[names.forwarded_for] = context.forwarded_for or hop or ""
    for name, value in (
        (names.uid, context.uid),
        (names.user_agent, context.user_agent),
        (names.user_ip, context.user_ip),
        (names.api_client, context.api_client),
    ):
        if value is not None:
            headers[name] = value
    if internal and context.id_token is not None:
        headers[names.id_token] = context.id_token
    return headers


class Inbound:
    """Finds the headers kiban reads in one pass over a request's raw header list.

    ASGI servers give header names in lower case (Starlette relies on it too), so a
    header is one dictionary lookup; repeated headers become one comma-separated list
    (RFC 9110). ``extra`` names other headers the request path wants from the same pass.
    """

    def __init__(
        self,
        names: HeaderNames | None = None,
        extra: Iterable[str] = (),
        trusted: TrustedPeers | None = None,
        untrusted_parent: Literal["link", "follow", "ignore"] = "link",
    ) -> None:
        self.names = names or HeaderNames()
        #: The peers whose propagation headers are believed.
        self.trusted = trusted if trusted is not None else TrustedPeers()
        #: What an untrusted caller's ``traceparent`` becomes: a span link, the parent
        #: (``follow``), or nothing (``ignore``). ``TRACE_UNTRUSTED_PARENT``.
        self.untrusted_parent = untrusted_parent
        wanted = {*self.names.model_dump().values(), "traceparent", "user-agent", *extra}
        self._wanted = {name.encode("latin-1"): name for name in wanted}
        self._trace_header = self.names.trace_id.encode("latin-1")
        self._request_header = self.names.request_id.encode("latin-1")
        self._order = _order(self.names)

    def read(self, raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
        headers: dict[str, str] = {}
        wanted = self._wanted
        for raw_name, raw_value in raw:
            name = wanted.get(raw_name)
            if name is not None:
                value = raw_value.decode("latin-1")
                if name in headers:
                    value = f"{headers[name]}, {value}"
                headers[name] = value
        return headers

    def context(
        self, headers: dict[str, str], remote_addr: str | None, trusted: bool | None = None
    ) -> RequestContext:
        """The request's context: the headers' word if the peer is trusted, else the peer's.

        ``trusted`` is whether ``remote_addr`` is a trusted peer, when the caller knows.
        """
        if trusted is None:
            trusted = remote_addr in self.trusted
        if trusted:
            return _from_values(map(headers.get, self._order), remote_addr, self.trusted)
        context = _untrusted(headers.get("user-agent"), remote_addr)
        if self.untrusted_parent == "follow":
            parent = headers.get("traceparent")
            if parent is not None:
                return context._replace(trace_id=_trace_id(None, parent))
        return context

    def parent(self, headers: dict[str, str], trusted: bool) -> tuple[str | None, bool]:
        """The ``traceparent`` to continue, and whether it is only to be linked.

        A trusted peer's is the parent; an untrusted one's is a link, the parent, or
        nothing, as ``TRACE_UNTRUSTED_PARENT`` says.
        """
        parent = headers.get("traceparent")
        if parent is None or trusted:
            return parent, False
        mode = self.untrusted_parent
        return (None if mode == "ignore" else parent), mode == "link"

    def echoed(self, context: RequestContext) -> list[tuple[bytes, bytes]]:
        """What every answer carries: the request's ids and the security headers."""
        return [
            (self._trace_header, context.trace_id.encode("latin-1")),
            (self._request_header, context.request_id.encode("latin-1")),
            *SECURITY_HEADERS,
        ]


def enter(context: RequestContext) -> Token[RequestContext | None]:
    """Make ``context`` the current request's; ``leave`` with the token when it ends."""
    return _current.set(context)


def leave(token: Token[RequestContext | None]) -> None:
    _current.reset(token)
