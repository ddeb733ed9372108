"""A matrix of real tokens against a JWT scheme: each gets exactly its status."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI
from starlette.testclient import TestClient

import kiban
from kiban._config import Settings
from kiban.security import JWKS, JWT, Security, TokenVerifier
from kiban.security._tokens import InvalidToken
from tests.conftest import Lines, free_port, secret
from tests.receivers import Reply, serve

ISSUER = "https://auth.example"
AUDIENCE = "shop"


def _rsa() -> tuple[Any, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return key, public


PRIVATE, PUBLIC = _rsa()
OTHER_PRIVATE, _ = _rsa()


def sign(
    claims: dict[str, Any] | None = None,
    *,
    key: Any = PRIVATE,
    alg: str = "RS256",
    headers: dict[str, Any] | None = None,
    **overrides: Any,
) -> str:
    now = int(time.time())
    payload = {
        "sub": "user-1",
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 300,
        "scope": "orders:read orders:write",
    }
    payload.update(claims or {})
    payload.update(overrides)
    payload = {k: v for k, v in payload.items() if v is not None}
    return secret(jwt.encode(payload, key, algorithm=alg, headers=headers))


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def app_with(scheme: JWT, scopes: tuple[str, ...] = ("orders:read",)) -> TestClient:
    app = FastAPI()
    kiban.Service(app, Settings(auth_failure_limit=None), security=Security(scheme, scopes=scopes))

    @app.get("/orders")
    async def orders() -> dict[str, str]:
        who = kiban.security.principal()
        assert who is not None
        return {"sub": who.subject}

    return TestClient(app)


SCHEME = JWT(algorithms=["RS256"], key=PUBLIC, issuer=ISSUER, audience=AUDIENCE, leeway=0)
client = app_with(SCHEME)


def status(token: str, scheme_client: TestClient = client) -> int:
    return scheme_client.get("/orders", headers={"authorization": f"Bearer {token}"}).status_code


def test_a_valid_token_passes_and_names_its_subject() -> None:
    response = client.get("/orders", headers={"authorization": f"Bearer {sign()}"})
    assert response.status_code == 200
    assert response.json() == {"sub": "user-1"}


@pytest.mark.parametrize(
    ("name", "token"),
    [
        ("expired", sign(exp=int(time.time()) - 60)),
        ("no exp", sign(exp=None)),
        ("not yet valid", sign(nbf=int(time.time()) + 60)),
        ("issued in the future", sign(iat=int(time.time()) + 120)),
        ("wrong issuer", sign(iss="https://evil.example")),
        ("partial issuer", sign(iss="https://auth.example.evil")),
        ("issuer prefix", sign(iss="https://auth")),
        ("missing issuer", sign(iss=None)),
        ("wrong audience", sign(aud="other")),
        ("signed by another key", sign(key=OTHER_PRIVATE)),
        (
            "alg none",
            jwt.encode(
                {"sub": "x", "iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 60},
                None,
                algorithm="none",
            ),
        ),
        (
            "HS256 where RS256 is expected",
            jwt.encode(
                {"sub": "x", "iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 60},
                b"a-32-byte-long-shared-secret-key",
                algorithm="HS256",
            ),
        ),
        ("oversized", sign(padding="x" * 10_000)),
        ("crit header", sign(headers={"crit": ["exp"]})),
        ("b64 header", sign(headers={"b64": False, "crit": ["b64"]})),
        ("two segments", "aaa.bbb"),
        ("garbage", "not a token at all"),
        ("non-JSON header", b64(b"{nope") + "." + b64(b"{}") + ".sig"),
        ("bad padding", "eyJhbGciOiJSUzI1NiJ9===.e30.x"),
    ],
)
def test_bad_tokens_are_401_never_500(name: str, token: str) -> None:
    assert status(token) == 401, name


def test_hs256_signed_with_the_rs256_public_key_is_refused() -> None:
    """The key-confusion attack: the verifier never uses the PEM as an HMAC secret."""
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64(
        json.dumps(
            {"sub": "admin", "iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 60}
        ).encode()
    )
    import hashlib
    import hmac

    signature = b64(hmac.new(PUBLIC, f"{header}.{payload}".encode(), hashlib.sha256).digest())
    assert status(f"{header}.{payload}.{signature}") == 401


def test_a_tampered_payload_is_refused() -> None:
    header, _, signature = sign().split(".")
    forged = b64(
        json.dumps(
            {"sub": "admin", "iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 60}
        ).encode()
    )
    assert status(f"{header}.{forged}.{signature}") == 401


def test_key_material_in_the_header_is_ignored() -> None:
    attacker = OTHER_PRIVATE.public_key()
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(attacker))
    token = sign(key=OTHER_PRIVATE, headers={"jwk": jwk, "jku": "https://evil.example/jwks"})
    assert status(token) == 401


def test_exp_boundaries_with_and_without_leeway() -> None:
    now = int(time.time())
    assert status(sign(exp=now)) == 401  # exp == now: expired
    lenient = app_with(
        JWT(algorithms=["RS256"], key=PUBLIC, issuer=ISSUER, audience=AUDIENCE, leeway=30)
    )
    assert status(sign(exp=now - 10), lenient) == 200  # within the leeway
    assert status(sign(exp=now - 60), lenient) == 401
    assert status(sign(nbf=now + 10), lenient) == 200
    assert status(sign(iat=now + 10), lenient) == 200
    assert status(sign(iat=now + 120), lenient) == 401


async def test_a_remembered_token_is_served_from_memory_until_it_expires() -> None:
    verifier = TokenVerifier(algorithms=["RS256"], key=PUBLIC, issuer=ISSUER, audience=AUDIENCE)
    token = sign(exp=int(time.time()) + 1)
    first = await verifier.verify(token)
    first["sub"] = "someone else"  # a caller's change never reaches what is remembered
    again = await verifier.verify(token)
    assert again["sub"] == "user-1"
    await asyncio.sleep(max(0.0, again["exp"] - time.time()) + 0.05)
    with pytest.raises(InvalidToken, match="expired"):
        await verifier.verify(token)


def test_a_missing_scope_is_403_naming_it() -> None:
    response = client.get("/orders", headers={"authorization": f"Bearer {sign(scope='x')}"})
    assert response.status_code == 403
    assert response.json()["detail"] == "Missing scope: orders:read."
    assert response.json()["missing_scopes"] == ["orders:read"]
    strict = app_with(SCHEME, scopes=("orders:read", "orders:write", "orders:admin"))
    response = strict.get("/orders", headers={"authorization": f"Bearer {sign()}"})
    assert response.status_code == 403
    assert response.json()["missing_scopes"] == ["orders:admin"]


def test_scopes_as_a_list_claim_count_too() -> None:
    assert status(sign(scope=None, scp=["orders:read"])) == 200


def test_missing_credentials_get_a_bearer_challenge() -> None:
    response = client.get("/orders")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Bearer realm="kiban"'
    assert response.headers["content-type"] == "application/problem+json"


def test_failures_are_logged_and_counted_without_the_token(lines: Lines) -> None:
    token = sign(exp=int(time.time()) - 60)
    client.get("/orders", headers={"authorization": f"Bearer {token}"})
    failure = next(line for line in lines.app() if line["msg"] == "authentication failed")
    assert failure["reason"] == "token expired"
    assert failure["scheme"] == "jwt"
    assert failure["route"] == "/orders"
    assert token not in lines.text()
    assert token.split(".")[1] not in lines.text()
    metrics = client.get("/metrics").text
    assert "kiban_auth_failures_total{" in metrics
    assert 'reason="token expired"' in metrics


def test_schemes_refuse_unsafe_algorithm_lists() -> None:
    with pytest.raises(ValueError, match="mix"):
        JWT(algorithms=["RS256", "HS256"], key=PUBLIC)
    with pytest.raises(ValueError, match="forbidden"):
        JWT(algorithms=["none"], key=PUBLIC)
    with pytest.raises(ValueError, match="exactly one"):
        JWT(algorithms=["RS256"])


async def test_kid_selects_from_a_fixed_set_only() -> None:
    verifier = TokenVerifier(algorithms=["RS256"], keys={"k1": PUBLIC}, issuer=ISSUER)
    assert (await verifier.verify(sign(headers={"kid": "k1"}, aud=None)))["sub"] == "user-1"
    with pytest.raises(InvalidToken, match="unknown kid"):
        await verifier.verify(sign(headers={"kid": "k2"}, aud=None))
    with pytest.raises(InvalidToken, match="kid"):
        await verifier.verify(sign(aud=None))


class JWKSServer:
    """A real JWKS endpoint whose keys can rotate or go away."""

    def __init__(self) -> None:
        self.keys: dict[str, Any] = {}
        self.up = True
        self.requests = 0
        #: Seconds each answer takes: an endpoint gone slow.
        self.stall = 0.0
        self.port = free_port()
        server = self

        def jwks(method: str, path: str, headers: Any, body: bytes) -> Reply:
            server.requests += 1
            time.sleep(server.stall)
            if not server.up:
                return 503, "", b""
            keys = [
                {
                    **json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key())),
                    "kid": kid,
                    "use": "sig",
                    "alg": "RS256",
                }
                for kid, key in server.keys.items()
            ]
            return 200, "application/json", json.dumps({"keys": keys}).encode()

        self.server = serve(jwks, self.port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/jwks.json"


@pytest.fixture
def jwks_server() -> Iterator[JWKSServer]:
    server = JWKSServer()
    yield server
    server.server.shutdown()


async def test_jwks_rotation_cooldown_and_outage(jwks_server: JWKSServer) -> None:
    jwks_server.keys = {"old": PRIVATE}
    jwks = JWKS(jwks_server.url, ttl=300, cooldown=0.5)
    verifier = TokenVerifier(algorithms=["RS256"], jwks=jwks)
    assert (await verifier.verify(sign(headers={"kid": "old"}, aud=None)))["sub"] == "user-1"
    assert jwks.fetches == 1
    # An unknown kid is refetched at most once per cooldown, however many tokens ask.
    await asyncio.sleep(0.6)
    for _ in range(20):
        with pytest.raises(InvalidToken, match="unknown kid"):
            await verifier.verify(sign(key=OTHER_PRIVATE, headers={"kid": "new"}, aud=None))
    assert jwks.fetches == 2
    # The issuer rotates: after the cooldown the new key is found.
    jwks_server.keys = {"old": PRIVATE, "new": OTHER_PRIVATE}
    await asyncio.sleep(0.6)
    token = sign(key=OTHER_PRIVATE, headers={"kid": "new"}, aud=None)
    assert (await verifier.verify(token))["sub"] == "user-1"
    # The endpoint goes down: the last good keys keep working.
    jwks_server.up = False
    jwks.ttl = 0
    await asyncio.sleep(0.6)
    assert (await verifier.verify(sign(headers={"kid": "old"}, aud=None)))["sub"] == "user-1"
    await jwks.settled()


async def test_stale_keys_verify_while_a_slow_jwks_endpoint_is_refetched(
    jwks_server: JWKSServer,
) -> None:
    jwks_server.keys = {"old": PRIVATE}
    now = [0.0]
    jwks = JWKS(jwks_server.url, ttl=300, cooldown=30, clock=lambda: now[0])
    assert await jwks.key("old") is not None
    jwks_server.stall = 0.5  # the endpoint goes slow
    now[0] = 301.0  # and the keys are stale
    began = time.monotonic()
    for _ in range(10):
        assert await jwks.key("old") is not None
    # Nobody waited for the slow fetch: it runs once, in the background.
    assert time.monotonic() - began < 0.25
    await jwks.settled()
    assert jwks.fetches == 2
    # A token naming a key not held does wait for it (once a cooldown).
    jwks_server.stall = 0.0
    jwks_server.keys = {"old": PRIVATE, "new": OTHER_PRIVATE}
    now[0] = 400.0
    assert await jwks.key("new") is not None
    assert jwks.fetches == 3


def test_the_default_leeway_is_small_and_exp_is_never_stretched_far() -> None:
    """The attack suite's finding: exp == now - 25 s passed with a 30 s default leeway."""
    now = int(time.time())
    default = app_with(JWT(algorithms=["RS256"], key=PUBLIC, issuer=ISSUER, audience=AUDIENCE))
    assert status(sign(exp=now - 25), default) == 401
    assert status(sign(exp=now - 6), default) == 401
    assert status(sign(exp=now + 2), default) == 200
    assert status(sign(exp=now), client) == 401  # leeway=0: exp == now is expired


def test_a_token_for_another_audience_is_refused_when_the_scheme_names_none() -> None:
    anyone = app_with(JWT(algorithms=["RS256"], key=PUBLIC, issuer=ISSUER))
    assert status(sign(aud="billing"), anyone) == 401
    assert status(sign(aud=None), anyone) == 200  # no audience claimed: nothing to mismatch


async def test_with_a_single_key_a_kid_selects_nothing() -> None:
    verifier = TokenVerifier(algorithms=["RS256"], key=PUBLIC, issuer=ISSUER, audience=AUDIENCE)
    assert (await verifier.verify(sign(headers={"kid": "anything"})))["sub"] == "user-1"
    with pytest.raises(InvalidToken, match="bad signature"):
        await verifier.verify(sign(key=OTHER_PRIVATE, headers={"kid": "anything"}))


def test_two_authorization_headers_are_refused_never_guessed() -> None:
    token = sign()
    response = client.get(
        "/orders",
        headers=[("authorization", f"Bearer {token}"), ("authorization", f"Bearer {token}")],
    )
    assert response.status_code == 401
    assert "ambiguous" in response.json()["detail"]
