"""JWT verification with the checks libraries leave optional, made mandatory.

- The algorithms come from the scheme, never from the token; ``none`` is refused even if
  listed, and a scheme never mixes MAC (HS*) and signature algorithms, so a token
  signed with HS256 using the public key as the secret cannot pass.
- ``exp`` is required; ``nbf`` and ``iat`` in the future (beyond the leeway) are refused;
  ``iss`` and ``aud`` must match exactly when configured.
- ``crit`` and unencoded payloads are refused; key material in the header (``jwk``,
  ``jku``, ``x5u``, ``x5c``) is ignored; ``kid`` only selects a key from a fixed set or
  the JWKS.
- Oversized tokens are refused before parsing; malformed ones are a 401, never a 500.
- A JWKS is cached, refetched on an unknown ``kid`` at most once per cooldown, and the
  last good keys are kept while the endpoint is down; stale keys are refreshed in the
  background, so a slow endpoint holds no request whose key is held.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kiban import _extras
from kiban import _log as log
from kiban._config import ConfigError

if TYPE_CHECKING:  # PyJWT and cryptography load with the first token check
    import httpx
    import jwt

__all__ = ["JWKS", "InvalidToken", "TokenVerifier"]

MAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
_SIGNATURE_ALGORITHMS = frozenset(
    {
        "RS256",
        "RS384",
        "RS512",
        "PS256",
        "PS384",
        "PS512",
        "ES256",
        "ES256K",
        "ES384",
        "ES512",
        "EdDSA",
        "Ed25519",
        "Ed448",
    }
)
MAX_TOKEN_BYTES = 8 * 1024


class InvalidToken(Exception):
    """The token is not acceptable; ``reason`` is safe to log (it holds no token data)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def check_algorithms(algorithms: Iterable[str]) -> tuple[str, ...]:
    chosen = tuple(algorithms)
    if not chosen:
        raise ValueError("a token scheme needs at least one algorithm")
    unknown = [alg for alg in chosen if alg not in MAC_ALGORITHMS | _SIGNATURE_ALGORITHMS]
    if unknown:
        raise ValueError(f"unsupported or forbidden algorithms: {unknown}")
    kinds = {alg in MAC_ALGORITHMS for alg in chosen}
    if len(kinds) > 1:
        raise ValueError("a token scheme must not mix HS* with signature algorithms")
    return chosen


class JWKS:
    """Keys from a JWKS URL: cached, refetched on an unknown kid at most once per cooldown.

    Keys past ``ttl`` still verify while they are refetched in the background: no
    request waits on a JWKS endpoint that has gone slow or down, except one whose
    token names a key not held, which waits for the fetch (at most once a cooldown).
    """

    def __init__(
        self,
        url: str,
        *,
        ttl: float = 300.0,
        cooldown: float = 30.0,
        timeout: float = 2.0,
        client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.ttl = ttl
        self.cooldown = cooldown
        self.timeout = timeout
        self.client = client
        self.clock = clock
        self.fetches = 0
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = -float("inf")
        self._attempted_at = -float("inf")
        self._lock = asyncio.Lock()
        self._refreshing: asyncio.Task[None] | None = None

    async def key(self, kid: str | None) -> jwt.PyJWK:
        now = self.clock()
        held = kid in self._keys if kid is not None else bool(self._keys)
        if not held:
            await self._refresh(now)  # the token needs keys not held: it waits for them
        elif (
            now - self._fetched_at > self.ttl
            and now - self._attempted_at >= self.cooldown
            and self._refreshing is None
        ):
            self._refreshing = asyncio.ensure_future(self._refresh(now))
            self._refreshing.add_done_callback(self._refreshed)
        if kid is None:
            if len(self._keys) == 1:
                return next(iter(self._keys.values()))
            raise InvalidToken("missing kid")
        try:
            return self._keys[kid]
        except KeyError:
            raise InvalidToken("unknown kid") from None

    def _refreshed(self, task: asyncio.Task[None]) -> None:
        self._refreshing = None
        if not task.cancelled():
            task.exception()  # none: a failed fetch is logged and the keys kept

    async def settled(self) -> None:
        """Wait for the background refresh in flight, if any."""
        if self._refreshing is not None:
            await asyncio.wait({self._refreshing})

    async def _refresh(self, now: float) -> None:
        import httpx
        import jwt

        async with self._lock:
            if now - self._attempted_at < self.cooldown:
                return  # someone just tried: never hammer the JWKS endpoint
            self._attempted_at = self.clock()
            self.fetches += 1
            try:
                if self.client is None:
                    async with httpx.AsyncClient(timeout=self.timeout) as client:
                        response = await client.get(self.url)
                else:
                    response = await self.client.get(self.url, timeout=self.timeout)
                response.raise_for_status()
                keys = {
                    str(item["kid"]): jwt.PyJWK(item)
                    for item in response.json()["keys"]
                    if "kid" in item and item.get("use", "sig") == "sig"
                }
            except Exception as exc:
                log.warning(
                    "JWKS fetch failed, keeping the last good keys",
                    error_type=type(exc).__name__,
                    keys=len(self._keys),
                )
                return
            self._keys = keys
            self._fetched_at = self.clock()


@dataclass(frozen=True)
class TokenVerifier:
    """Verifies JWTs for one scheme: its algorithms, keys and expected claims.

    A token that verified is remembered (up to ``cache_size`` of them) until it
    expires: the same token on the next request costs a lookup and an expiry check
    instead of a base64 pass, a signature check and the claim checks, as Envoy's JWT
    filter does. A key removed from a JWKS therefore stops new tokens at once and the
    tokens it already accepted when they expire.
    """

    cache_size = 4096

    algorithms: Sequence[str]
    key: Any = None
    keys: Mapping[str, Any] | None = None
    jwks: JWKS | None = None
    issuer: str | None = None
    audience: str | None = None
    leeway: float = 0.0
    required_claims: Sequence[str] = ()

    def __post_init__(self) -> None:
        _extras.require("jwt", "jwt", "JWT verification")
        object.__setattr__(self, "algorithms", check_algorithms(self.algorithms))
        if sum(source is not None for source in (self.key, self.keys, self.jwks)) != 1:
            raise ValueError("give exactly one of key, keys or jwks")
        object.__setattr__(self, "_prepared", {})
        object.__setattr__(self, "_verified", {})
        # A key that cannot be parsed stops the service at start-up, not every request.
        for key in [self.key] if self.key is not None else list((self.keys or {}).values()):
            for algorithm in self.algorithms:
                try:
                    self._prepare(key, algorithm)
                except Exception as exc:  # PyJWT raises several kinds; none carries the key
                    raise ConfigError(
                        f"the JWT key is not a valid {algorithm} key ({type(exc).__name__})"
                    ) from None

    def _prepare(self, key: Any, algorithm: str) -> Any:
        """Parse a PEM key once per algorithm, not on every token (it costs more than
        the signature check)."""
        import jwt

        if not isinstance(key, str | bytes):
            return key
        prepared: dict[tuple[int, str], Any] = self._prepared  # type: ignore[attr-defined]
        cache_key = (id(key), algorithm)
        if cache_key not in prepared:
            prepared[cache_key] = jwt.get_algorithm_by_name(algorithm).prepare_key(key)
        return prepared[cache_key]

    async def verify(self, token: str) -> dict[str, Any]:
        verified: dict[str, tuple[dict[str, Any], float]] = self._verified  # type: ignore[attr-defined]
        remembered = verified.get(token)
        if remembered is not None:
            claims, expires = remembered
            if time.time() < expires + self.leeway:
                return dict(claims)
            del verified[token]  # expired: the full check below says so
        claims = await self._verify(token)
        exp = claims.get("exp")
        if isinstance(exp, int | float):
            if len(verified) >= self.cache_size:
                del verified[next(iter(verified))]  # the oldest
            verified[token] = (dict(claims), float(exp))
        return claims

    async def _verify(self, token: str) -> dict[str, Any]:
        import jwt

        if len(token) > MAX_TOKEN_BYTES:
            raise InvalidToken("token too large")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidToken("malformed token") from None
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in self.algorithms:
            raise InvalidToken("algorithm not allowed")
        if "crit" in header or "b64" in header:
            raise InvalidToken("unsupported critical header")
        key = await self._key(header.get("kid"))
        try:
            key = self._prepare(key, algorithm)
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                issuer=self.issuer,
                audience=self.audience,
                leeway=self.leeway,
                # PyJWT's default: a token naming an audience is refused unless it is
                # ours, and refused when the scheme names none.
                options={"require": ["exp", *self.required_claims], "strict_aud": False},
            )
        except jwt.ExpiredSignatureError:
            raise InvalidToken("token expired") from None
        except jwt.ImmatureSignatureError:
            raise InvalidToken("token not yet valid") from None
        except jwt.InvalidIssuerError:
            raise InvalidToken("wrong issuer") from None
        except jwt.InvalidAudienceError:
            raise InvalidToken("wrong audience") from None
        except jwt.MissingRequiredClaimError as exc:
            raise InvalidToken(f"missing claim {exc.claim}") from None
        except jwt.InvalidSignatureError:
            raise InvalidToken("bad signature") from None
        except (jwt.PyJWTError, ValueError, TypeError):
            raise InvalidToken("invalid token") from None
        return claims

    async def _key(self, kid: Any) -> Any:
        if kid is not None and not isinstance(kid, str):
            raise InvalidToken("malformed kid")
        if self.key is not None:
            return self.key
        if self.keys is not None:
            if kid is None or kid not in self.keys:
                raise InvalidToken("unknown kid")
            return self.keys[kid]
        assert self.jwks is not None
        jwk = await self.jwks.key(kid)
        return jwk.key


def algorithm_for(key: Any) -> str:
    """The signature algorithm a private key signs with."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return "EdDSA"
    if isinstance(key, rsa.RSAPrivateKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return "ES256"
    raise ValueError(f"unsupported signing key {type(key).__name__}")


def mint(
    private_key_pem: bytes,
    subject: str,
    *,
    issuer: str | None = None,
    audience: str | None = None,
    scopes: Sequence[str] = (),
    ttl: float = 3600.0,
    kid: str | None = None,
    claims: Mapping[str, Any] | None = None,
) -> str:
    """A signed token for development and tests (``kiban token``)."""
    import jwt
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key(private_key_pem, password=None)
    now = int(time.time())
    payload: dict[str, Any] = {"sub": subject, "iat": now, "exp": now + int(ttl)}
    if issuer:
        payload["iss"] = issuer
    if audience:
        payload["aud"] = audience
    if scopes:
        payload["scope"] = " ".join(scopes)
    payload.update(claims or {})
    headers = {"kid": kid} if kid else None
    return jwt.encode(payload, key, algorithm=algorithm_for(key), headers=headers)  # type: ignore[arg-type]
