"""Security schemes: how a request proves who it is.

Each scheme reads its credentials from the request and returns a Principal, returns
None when the request carries none of its credentials, or raises AuthError when they
are present but wrong. Schemes needing a lookup call a validator the service supplies
(as Goa's generated auth functions do).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from starlette.requests import HTTPConnection

from kiban import _propagation as propagation
from kiban._breaker import Breaker
from kiban._errors import Problem
from kiban._occasional import Occasional
from kiban.security._tokens import JWKS, InvalidToken, TokenVerifier

if TYPE_CHECKING:
    from kiban.security._declare import Alternative

__all__ = [
    "JWT",
    "APIKey",
    "AuthError",
    "BasicAuth",
    "InternalIDToken",
    "OAuth2",
    "Principal",
    "Scheme",
]


@dataclass(frozen=True)
class Principal:
    """Who the request is from, as a scheme established it."""

    scheme: str
    subject: str
    scopes: frozenset[str] = frozenset()
    claims: Mapping[str, Any] = field(default_factory=dict, repr=False)


class AuthError(Exception):
    """Credentials were given but are not valid. ``reason`` is safe to log and to show."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Scheme:
    """Base of the schemes. ``name`` keys it in the OpenAPI ``securitySchemes``."""

    name: str
    #: Whether the principals it proves are users (``uid``) or API clients (``api_client``).
    identifies: Literal["user", "client"] = "user"

    def identify(self, who: Principal) -> None:
        """Make ``who`` the request's identity: in its context, logs and downstream calls."""
        if self.identifies == "client":
            propagation.identify(api_client=who.subject)
        else:
            propagation.identify(uid=who.subject)

    async def authenticate(self, request: HTTPConnection) -> Principal | None:
        raise NotImplementedError

    def challenge(self) -> str:
        """The WWW-Authenticate challenge for a 401."""
        raise NotImplementedError

    def query_credentials(self) -> tuple[str, ...]:
        """Query parameters this scheme reads a credential from: the access log redacts them."""
        return ()

    def openapi(self) -> dict[str, Any]:
        raise NotImplementedError

    def requiring(self, *scopes: str) -> Alternative:
        """This scheme with its own scopes, to combine: ``Security(jwt.requiring("a"), key)``."""
        from kiban.security._declare import Alternative

        return Alternative(self, frozenset(scopes))


def _scopes(claims: Mapping[str, Any]) -> frozenset[str]:
    """Scopes from ``scope`` (space-separated, RFC 8693) or ``scp``/``scopes`` (lists)."""
    value = claims.get("scope", claims.get("scp", claims.get("scopes", ())))
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list | tuple):
        return frozenset(str(item) for item in value)
    return frozenset()


def _header(request: HTTPConnection, name: bytes) -> str | None:
    """The value of a credential header (``name`` in lower case, as ASGI servers give
    names), scanned as Starlette's ``Headers`` does without building one per scheme.

    Sent twice, a credential is ambiguous: a proxy that reads the last copy and kiban
    reading the first would disagree on who is calling, so it is refused, never guessed.
    """
    found = None
    for key, value in request.scope["headers"]:
        if key == name:
            if found is not None:
                raise AuthError("ambiguous credentials: header sent twice")
            found = value.decode("latin-1")
    return found


def _bearer(request: HTTPConnection) -> str | None:
    header = _header(request, b"authorization")
    if header is None:
        return None
    kind, _, token = header.partition(" ")
    if kind.lower() != "bearer":
        return None
    token = token.strip()
    if not token:
        raise AuthError("empty bearer token")
    return token


Validated = Principal | bool | None


class BasicAuth(Scheme):
    """HTTP Basic: ``validate(username, password)`` says whether they match."""

    def __init__(
        self,
        validate: Callable[[str, str], Awaitable[Validated]],
        *,
        name: str = "basic",
        realm: str = "kiban",
    ) -> None:
        self.validate = validate
        self.name = name
        self.realm = realm

    async def authenticate(self, request: HTTPConnection) -> Principal | None:
        header = _header(request, b"authorization")
        if header is None:
            return None
        kind, _, encoded = header.partition(" ")
        if kind.lower() != "basic":
            return None
        try:
            username, sep, password = (
                base64.b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")
            )
        except (binascii.Error, UnicodeDecodeError):
            raise AuthError("malformed basic credentials") from None
        if not sep:
            raise AuthError("malformed basic credentials")
        result = await self.validate(username, password)
        if isinstance(result, Principal):
            return result
        if result is True:
            return Principal(self.name, username)
        raise AuthError("invalid username or password")

    def challenge(self) -> str:
        return f'Basic realm="{self.realm}", charset="UTF-8"'

    def openapi(self) -> dict[str, Any]:
        return {"type": "http", "scheme": "basic"}


class APIKey(Scheme):
    """An API key in a header, query parameter or cookie; ``validate(key)`` finds its owner.

    An API key names a client, not a user: its principal's subject is the client.
    """

    identifies: Literal["user", "client"] = "client"

    def __init__(
        self,
        validate: Callable[[str], Awaitable[Validated]],
        *,
        name: str = "api_key",
        parameter: str = "x-api-key",
        location: Literal["header", "query", "cookie"] = "header",
    ) -> None:
        self.validate = validate
        self.name = name
        self.parameter = parameter
        self.location = location
        self._raw_name = parameter.lower().encode("latin-1")
        #: The principal of each valid key seen lately: a digest is not worth redoing.
        self._principals: dict[str, Principal] = {}

    async def authenticate(self, request: HTTPConnection) -> Principal | None:
        if self.location == "header":
            key = _header(request, self._raw_name)
        elif self.location == "query":
            keys = request.query_params.getlist(self.parameter)
            if len(keys) > 1:
                raise AuthError("ambiguous credentials: parameter sent twice")
            key = keys[0] if keys else None
        else:
            key = request.cookies.get(self.parameter)
        if key is None:
            return None
        if not key or len(key) > 512:
            raise AuthError("malformed api key")
        result = await self.validate(key)
        if isinstance(result, Principal):
            return result
        if result is True:
            found = self._principals.get(key)
            if found is None:
                if len(self._principals) >= 1024:
                    self._principals.clear()
                digest = hashlib.sha256(key.encode()).hexdigest()[:12]
                found = self._principals[key] = Principal(self.name, f"key-{digest}")
            return found
        raise AuthError("invalid api key")

    def query_credentials(self) -> tuple[str, ...]:
        return (self.parameter,) if self.location == "query" else ()

    def challenge(self) -> str:
        return f'APIKey realm="kiban", in="{self.location}", name="{self.parameter}"'

    def openapi(self) -> dict[str, Any]:
        return {"type": "apiKey", "in": self.location, "name": self.parameter}


def _verifier(
    algorithms: Sequence[str],
    key: Any,
    keys: Mapping[str, Any] | None,
    jwks_url: str | None,
    issuer: str | None,
    audience: str | None,
    leeway: float,
    required_claims: Sequence[str],
) -> TokenVerifier:
    return TokenVerifier(
        algorithms=algorithms,
        key=key,
        keys=keys,
        jwks=JWKS(jwks_url) if jwks_url else None,
        issuer=issuer,
        audience=audience,
        leeway=leeway,
        required_claims=required_claims,
    )


class JWT(Scheme):
    """A bearer JWT: verified signature and claims, scopes from ``scope``/``scp``.

    ``leeway`` (5 s) allows for clocks that disagree a little: a token is refused from
    ``exp + leeway`` on, and while its ``nbf`` or ``iat`` is more than that ahead.
    ``audience`` is the service's name in ``aud``; without one, a token that names any
    audience is refused (it was minted for someone else). With a single ``key``, a
    ``kid`` in the token's header selects nothing: every token is checked against that
    key. With ``keys`` (or a JWKS), the ``kid`` must name one of them.
    """

    def __init__(
        self,
        *,
        algorithms: Sequence[str] = ("RS256",),
        key: Any = None,
        keys: Mapping[str, Any] | None = None,
        jwks_url: str | None = None,
        issuer: str | None = None,
        audience: str | None = None,
        leeway: float = 5.0,
        required_claims: Sequence[str] = ("sub",),
        name: str = "jwt",
    ) -> None:
        self.verifier = _verifier(
            algorithms, key, keys, jwks_url, issuer, audience, leeway, required_claims
        )
        self.name = name

    async def authenticate(self, request: HTTPConnection) -> Principal | None:
        token = _bearer(request)
        if token is None:
            return None
        return await self.principal(token)

    async def principal(self, token: str) -> Principal:
        try:
            claims = await self.verifier.verify(token)
        except InvalidToken as exc:
            raise AuthError(exc.reason) from None
        return Principal(self.name, str(claims.get("sub", "")), _scopes(claims), claims)

    def challenge(self) -> str:
        return 'Bearer realm="kiban"'

    def openapi(self) -> dict[str, Any]:
        return {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}


class Introspection:
    """RFC 7662 token introspection, with answers cached briefly by token hash.

    Concurrent requests with the same token not yet cached wait for one call, not one
    each. An authorization server that keeps failing is throttled (``Breaker``): most
    requests then get their 503 at once instead of after ``timeout``, and calls get
    through again as it recovers. Failures are logged at most once a second.
    """

    def __init__(
        self,
        url: str,
        client_id: str,
        client_secret: str,
        *,
        cache_seconds: float = 30.0,
        timeout: float = 2.0,
        breaker: Breaker | None = None,
    ) -> None:
        self.url = url
        self.auth = (client_id, client_secret)
        self.cache_seconds = cache_seconds
        self.timeout = timeout
        self.breaker = breaker or Breaker()
        self.unavailable = Occasional("token introspection unavailable")
        self._cache: dict[str, tuple[float, dict[str, Any]]] = {}
        self._asking: dict[str, asyncio.Task[dict[str, Any]]] = {}

    async def claims(self, token: str) -> dict[str, Any]:
        digest = hashlib.sha256(token.encode()).hexdigest()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > time.monotonic():
            answer = cached[1]
        else:
            asking = self._asking.get(digest)
            if asking is None:
                asking = self._asking[digest] = asyncio.ensure_future(self._ask(token, digest))
                asking.add_done_callback(lambda _: self._asking.pop(digest, None))
                asking.add_done_callback(_retrieved)
            # Shielded: one caller going away (a client that hung up) does not cancel
            # the call the others wait for.
            answer = await asyncio.shield(asking)
        if answer.get("active") is not True:
            raise AuthError("token not active")
        exp = answer.get("exp")
        if isinstance(exp, int | float) and exp <= time.time():
            raise AuthError("token expired")
        return dict(answer)

    async def _ask(self, token: str, digest: str) -> dict[str, Any]:
        """The authorization server's answer for ``token``, cached; or the 503 problem."""
        import httpx

        if not self.breaker.allow():
            raise self._failed("BreakerOpen")
        try:
            async with httpx.AsyncClient(timeout=self.timeout) as client:
                response = await client.post(self.url, data={"token": token}, auth=self.auth)
            response.raise_for_status()
            answer = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            self.breaker.record(False)
            raise self._failed(type(exc).__name__) from None
        if not isinstance(answer, dict):  # RFC 7662 §2.2: a JSON object
            self.breaker.record(False)
            raise self._failed("not a JSON object")
        self.breaker.record(True)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[digest] = (time.monotonic() + self.cache_seconds, answer)
        return answer

    def _failed(self, error: str) -> Problem:
        """The authorization server could not say: its fault, not the client's (503)."""
        self.unavailable.warning(error_type=error)
        return Problem(
            503, "Token introspection is unavailable; retry later.", headers={"retry-after": "1"}
        )


def _retrieved(task: asyncio.Task[Any]) -> None:
    """A shared call's failure goes to whoever waited for it; none may be left waiting."""
    if not task.cancelled():
        task.exception()


class OAuth2(Scheme):
    """OAuth2 bearer tokens, validated as JWTs or by introspection; flows for OpenAPI."""

    def __init__(
        self,
        *,
        flows: Mapping[str, Mapping[str, Any]],
        jwt: JWT | None = None,
        introspection: Introspection | None = None,
        name: str = "oauth2",
    ) -> None:
        if (jwt is None) == (introspection is None):
            raise ValueError("give exactly one of jwt or introspection")
        self.flows = {flow: dict(spec) for flow, spec in flows.items()}
        self.jwt = jwt
        self.introspection = introspection
        self.name = name

    async def authenticate(self, request: HTTPConnection) -> Principal | None:
        token = _bearer(request)
        if token is None:
            return None
        if self.jwt is not None:
            principal = await self.jwt.principal(token)
            return Principal(self.name, principal.subject, principal.scopes, principal.claims)
        assert self.introspection is not None
        claims = await self.introspection.claims(token)
        return Principal(self.name, str(claims.get("sub", "")), _scopes(claims), claims)

    def challenge(self) -> str:
        return 'Bearer realm="kiban"'

    def openapi(self) -> dict[str, Any]:
        flows = {flow: {"scopes": {}, **spec} for flow, spec in self.flows.items()}
        return {"type": "oauth2", "flows": flows}


class InternalIDToken(JWT):
    """The identity token an API gateway signs and passes to backends in a header.

    Verified as a JWT (the same checks); unsigned or wrongly signed tokens are refused,
    and a valid one makes its subject the request's uid. It is read from the request
    itself, whoever sent it: its signature, not the peer, is what is trusted, and once
    verified it is what goes on to internal services.
    """

    def __init__(
        self,
        *,
        algorithms: Sequence[str] = ("EdDSA",),
        header: str = "x-internal-id-token",
        name: str = "internal_id_token",
        **verification: Any,
    ) -> None:
        super().__init__(algorithms=algorithms, name=name, **verification)
        self.header = header
        self._raw_name = header.lower().encode("latin-1")

    async def authenticate(self, request: HTTPConnection) -> Principal | None:
        token = _header(request, self._raw_name)
        if token is None:
            return None
        principal = await self.principal(token)
        propagation.identify(id_token=token)
        return principal

    def challenge(self) -> str:
        return f'InternalIDToken header="{self.header}"'

    def openapi(self) -> dict[str, Any]:
        return {
            "type": "apiKey",
            "in": "header",
            "name": self.header,
            "description": "Identity token signed by the API gateway.",
        }
