"""The trust boundary as an attacker meets it: no header typed by a peer outside
``TRUSTED_PROXIES`` changes identity, limits, logs or the host a redirect points to;
guessing credentials is throttled."""

from __future__ import annotations

import time
from typing import Any

import pytest
from fastapi import APIRouter, FastAPI
from starlette.testclient import TestClient

import kiban
from kiban._config import Settings
from kiban._ratelimit import RateLimit
from kiban.security import JWT, APIKey, NoSecurity, RateLimited, Security
from tests.conftest import ROOT, Lines, bearer, secret

pytestmark = pytest.mark.usefixtures("still_clock")
GATEWAY = ("10.0.0.3", 5000)
STRANGER = ("198.51.100.4", 5000)
KEY = {"x-api-key": secret("partner-key-1")}
#: Every header an attacker would type to pass for someone else.
FORGED = {
    "x-uid": "admin",
    "x-api-client": "partner",
    "x-user-ip": "10.9.9.9",
    "x-forwarded-for": "10.9.9.9",
    "x-forwarded-user-agent": "Trusted/1",
}


async def _partner(key: str) -> bool:
    return key == "partner-key-1"


def make_app(**settings: Any) -> FastAPI:
    app = FastAPI()
    jwt = JWT(
        algorithms=["EdDSA"],
        key=(ROOT / "services/devkeys/auth-dev.pub.pem").read_bytes(),
        issuer="kiban-dev-auth",
    )
    api_key = APIKey(_partner)
    kiban.Service(
        app,
        Settings(trusted_proxies=["10.0.0.0/8"], **settings),
        security=Security(jwt),
        rate_limit=RateLimit("3/minute", key="subject"),
    )

    @app.get("/me")
    async def me() -> dict[str, Any]:
        context = kiban.current()
        assert context is not None
        return {"uid": context.uid, "api_client": context.api_client}

    @app.get("/public", dependencies=[NoSecurity(), RateLimited("3/minute", key="ip")])
    async def public() -> dict[str, str]:
        return {}

    @app.get(
        "/partner", dependencies=[Security(api_key), RateLimited("3/minute", key="api_client")]
    )
    async def partner() -> dict[str, Any]:
        context = kiban.current()
        assert context is not None
        return {"uid": context.uid, "api_client": context.api_client}

    router = APIRouter(dependencies=[NoSecurity()])

    @router.get("/folder/")
    async def folder() -> dict[str, str]:
        return {}

    app.include_router(router)
    return app


def test_identity_in_logs_and_context_is_the_verified_principal(lines: Lines) -> None:
    with TestClient(make_app(), client=STRANGER) as client:
        assert client.get("/me", headers={**FORGED, **bearer("u-7")}).json() == {
            "uid": "u-7",
            "api_client": None,
        }
        assert client.get("/partner", headers={**FORGED, **KEY}).json() == {
            "uid": None,
            "api_client": _digest("partner-key-1"),
        }
        assert client.get("/me", headers=FORGED).status_code == 401
    ok, partner, refused = lines.access()
    assert (ok["uid"], ok["api_client"], ok["user_ip"]) == ("u-7", None, "198.51.100.4")
    assert ok["forwarded_for"] is None
    assert ok["user_agent"] != "Trusted/1"
    assert partner["uid"] is None
    assert partner["api_client"] == _digest("partner-key-1")
    assert (refused["uid"], refused["api_client"]) == (None, None)
    [failure] = [line for line in lines.app() if line["msg"] == "authentication failed"]
    assert "uid" not in failure
    assert failure["client"] == "198.51.100.4"


def test_a_verified_principal_replaces_what_a_trusted_gateway_claimed(lines: Lines) -> None:
    with TestClient(make_app(), client=GATEWAY) as client:
        assert client.get("/me", headers={"x-uid": "someone", **bearer("u-7")}).json()["uid"] == (
            "u-7"
        )
        claimed = client.get("/public", headers={"x-uid": "u-9", "x-user-ip": "203.0.113.5"})
        assert claimed.status_code == 200
    verified, public = lines.access()
    assert verified["uid"] == "u-7"
    assert (public["uid"], public["user_ip"]) == ("u-9", "203.0.113.5")  # the gateway's word


@pytest.mark.parametrize(
    ("path", "credentials"), [("/public", {}), ("/partner", KEY), ("/me", bearer("u-1"))]
)
def test_rotating_headers_buys_no_extra_request(path: str, credentials: dict[str, str]) -> None:
    with TestClient(make_app(), client=STRANGER) as client:
        statuses = [
            client.get(
                path,
                headers={
                    **credentials,
                    "x-uid": f"u-{n}",
                    "x-user-ip": f"203.0.113.{n}",
                    "x-forwarded-for": f"203.0.113.{n}",
                    "x-api-client": f"client-{n}",
                },
            ).status_code
            for n in range(6)
        ]
    assert statuses == [200, 200, 200, 429, 429, 429]


def test_behind_a_trusted_proxy_the_limit_is_per_end_user() -> None:
    with TestClient(make_app(), client=GATEWAY) as client:
        first = [
            client.get("/public", headers={"x-forwarded-for": "203.0.113.1"}).status_code
            for _ in range(4)
        ]
        other = client.get("/public", headers={"x-forwarded-for": "203.0.113.2"}).status_code
    assert first == [200, 200, 200, 429]
    assert other == 200


def test_guessing_api_keys_is_throttled_before_the_key_is_checked(lines: Lines) -> None:
    with TestClient(make_app(auth_failure_limit="5/minute"), client=STRANGER) as client:
        guesses = [
            client.get("/partner", headers={"x-api-key": f"guess-{n}"}).status_code
            for n in range(5)
        ]
        right = client.get("/partner", headers=KEY)
        metrics = client.get("/metrics").text
    assert guesses == [401] * 5
    assert right.status_code == 429  # even the right key: the guesser learns nothing
    assert right.headers["content-type"] == "application/problem+json"
    assert int(right.headers["retry-after"]) > 0
    assert [line["reason"] for line in lines.app() if line["msg"] == "authentication failed"][
        -1
    ] == "throttled"
    assert 'reason="throttled"' in metrics
    began = time.monotonic()
    with TestClient(make_app(auth_failure_limit="5/minute"), client=STRANGER) as client:
        for n in range(5 + 250):  # a guesser that goes on past the throttle
            client.get("/partner", headers={"x-api-key": f"guess-{n}"})
        metrics = client.get("/metrics").text
    throttled = [line for line in lines.app() if line.get("reason") == "throttled"][1:]
    # Every refusal is counted, and logged at most once a second: a client cannot
    # flood the logs by guessing on.
    assert len(throttled) <= 1 + (time.monotonic() - began)
    assert throttled[0]["occurrences"] == 1
    counted = next(
        line
        for line in metrics.splitlines()
        if line.startswith("kiban_auth_failures_total") and 'reason="throttled"' in line
    )
    assert counted.endswith(" 250.0")
    with TestClient(make_app(auth_failure_limit="5/minute"), client=GATEWAY) as client:
        assert client.get("/partner", headers=KEY).status_code == 200  # another client IP


def test_a_host_the_service_does_not_serve_is_400_and_probes_still_answer() -> None:
    with TestClient(make_app(allowed_hosts=["api.example.com", "*.svc"]), client=STRANGER) as c:
        refused = c.get("/public", headers={"host": "evil.example"})
        assert refused.status_code == 400
        assert refused.headers["content-type"] == "application/problem+json"
        assert c.get("/public", headers={"host": "api.example.com:443"}).status_code == 200
        assert c.get("/public", headers={"host": "members.svc"}).status_code == 200
        assert c.get("/health/liveness", headers={"host": "10.1.2.3:8000"}).status_code == 200


def test_a_redirect_never_points_at_the_host_a_client_typed() -> None:
    with TestClient(make_app(), client=STRANGER) as client:
        response = client.get("/folder", headers={"host": "evil.example"}, follow_redirects=False)
    assert response.status_code == 307
    assert response.headers["location"] == "/folder/"


def _digest(key: str) -> str:
    import hashlib

    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]
