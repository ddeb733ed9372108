"""Inbound headers become one immutable RequestContext; unsafe values never get in, and
nothing a peer outside ``TRUSTED_PROXIES`` asserts gets in at all."""

from __future__ import annotations

import dataclasses
import re

import pytest
from fastapi import FastAPI
from hypothesis import given
from hypothesis import strategies as st
from starlette.testclient import TestClient

import kiban
from kiban import _propagation as propagation
from kiban._config import HeaderNames, Settings
from kiban._propagation import from_headers, outbound_headers
from kiban._trust import TrustedPeers
from kiban.security import NoSecurity

NAMES = HeaderNames()
HEX32 = re.compile(r"[0-9a-f]{32}")
#: The gateway's network in these tests: peers in 10.0.0.0/8 may assert headers.
GATEWAY = TrustedPeers(["10.0.0.0/8"])
#: Every header a gateway could set, with a value that would pass every check.
ASSERTED = {
    "x-trace-id": "4BF92F3577B34DA6A3CE929D0E0E4736",
    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "x-request-id": "req-1",
    "x-uid": "u-42",
    "x-forwarded-user-agent": "Mobile/1.0",
    "user-agent": "gateway/2",
    "x-user-ip": "203.0.113.7",
    "x-forwarded-for": "203.0.113.7,10.0.0.1",
    "x-api-client": "ios-app",
    "x-internal-id-token": "eyJ.token.sig",
    "x-debug": "1",
}


def test_reads_every_propagated_header_from_a_trusted_peer() -> None:
    context = from_headers(ASSERTED, NAMES, "10.0.0.2", GATEWAY)
    assert context.trace_id == "0af7651916cd43dd8448eb211c80319c"  # traceparent names the span
    assert context.request_id == "req-1"
    assert context.uid == "u-42"
    assert context.user_agent == "Mobile/1.0"  # the end user's, not the gateway's
    assert context.user_ip == "203.0.113.7"
    assert context.forwarded_for == "203.0.113.7, 10.0.0.1"
    assert context.remote_addr == "10.0.0.2"
    assert context.api_client == "ios-app"
    assert context.id_token == "eyJ.token.sig"
    assert context.debug is True


@pytest.mark.parametrize("peer", ["192.0.2.50", "11.0.0.1", None, "testclient", "::1"])
def test_an_untrusted_peer_asserts_nothing(peer: str | None) -> None:
    """What a direct client types is not believed: the context is what kiban saw."""
    context = from_headers(ASSERTED, NAMES, peer, GATEWAY)
    assert context.trace_id != "4bf92f3577b34da6a3ce929d0e0e4736"
    assert context.trace_id != "0af7651916cd43dd8448eb211c80319c"
    assert context.request_id != "req-1"
    assert context.uid is None
    assert context.api_client is None
    assert context.id_token is None
    assert context.debug is False
    assert context.user_agent == "gateway/2"  # its own User-Agent, which it is
    assert context.user_ip == peer
    assert context.forwarded_for is None
    out = outbound_headers(context, NAMES)
    assert out.get("x-forwarded-for") == peer  # the chain starts at this hop
    assert set(out) <= {"x-trace-id", "x-forwarded-for", "x-forwarded-user-agent", "x-user-ip"}


def test_nothing_is_trusted_by_default() -> None:
    assert from_headers(ASSERTED, NAMES, "127.0.0.1").uid is None
    assert from_headers(ASSERTED, NAMES, "10.0.0.2").user_ip == "10.0.0.2"


@pytest.mark.parametrize(
    ("forwarded_for", "client"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("203.0.113.7, 10.0.0.9", "203.0.113.7"),  # a trusted hop is skipped
        ("6.6.6.6, 203.0.113.7, 10.0.0.9", "203.0.113.7"),  # left of it: client-typed
        ("10.0.0.8, 10.0.0.9", "10.0.0.8"),  # all trusted: the left-most
        ("::ffff:10.0.0.3, 198.51.100.1", "198.51.100.1"),
    ],
)
def test_forwarded_for_is_walked_from_the_right_past_trusted_hops(
    forwarded_for: str, client: str
) -> None:
    context = from_headers({"x-forwarded-for": forwarded_for}, NAMES, "10.0.0.2", GATEWAY)
    assert context.user_ip == client


def test_trusted_peers_parse_networks_and_addresses() -> None:
    peers = TrustedPeers(["10.0.0.0/8", "192.0.2.1", "fd00::/8"])
    assert "10.255.0.1" in peers
    assert "192.0.2.1" in peers
    assert "192.0.2.2" not in peers
    assert "fd00::1" in peers
    assert "::ffff:10.1.1.1" in peers  # an IPv4 peer on a dual-stack socket
    assert "not-an-ip" not in peers
    assert None not in peers
    assert not TrustedPeers()


def test_context_is_immutable_and_hides_the_token_from_repr() -> None:
    context = from_headers({"x-internal-id-token": "secret-token"}, NAMES, "10.2.3.4", GATEWAY)
    with pytest.raises(dataclasses.FrozenInstanceError):
        context.uid = "other"  # type: ignore[misc]
    assert "secret-token" not in repr(context)


def test_generates_ids_when_none_came_in_and_falls_back_to_the_peer() -> None:
    context = from_headers({"user-agent": "curl/8"}, NAMES, "192.0.2.1")
    assert HEX32.fullmatch(context.trace_id)
    assert HEX32.fullmatch(context.request_id)
    assert context.user_agent == "curl/8"
    assert context.user_ip == "192.0.2.1"
    assert context.uid is None


def test_trace_id_is_taken_from_traceparent_when_no_trace_header() -> None:
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    context = from_headers({"traceparent": traceparent}, NAMES, "10.0.0.1", GATEWAY)
    assert context.trace_id == "0af7651916cd43dd8448eb211c80319c"


def test_uuid_trace_ids_are_normalised() -> None:
    context = from_headers(
        {"x-trace-id": "0AF76519-16CD-43DD-8448-EB211C80319C"}, NAMES, "10.0.0.1", GATEWAY
    )
    assert context.trace_id == "0af7651916cd43dd8448eb211c80319c"


@pytest.mark.parametrize(
    "bad", ["", "xyz", "0" * 32, "a" * 33, "g" * 32, "4bf92f35 77b34da6a3ce929d0e0e4736"]
)
def test_invalid_trace_ids_are_replaced(bad: str) -> None:
    context = from_headers({"x-trace-id": bad}, NAMES, "10.0.0.1", GATEWAY)
    assert HEX32.fullmatch(context.trace_id)
    assert context.trace_id != bad


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("x-uid", "u1\r\nx-admin: yes"),
        ("x-uid", "u" * 600),
        ("x-api-client", "app\x00"),
        ("x-forwarded-for", "1.2.3.4, evil header"),
        ("x-forwarded-for", "1.2.3.4\n, 5.6.7.8"),
        ("x-user-ip", "1.2.3.4 <script>"),
    ],
)
def test_unsafe_values_are_dropped(header: str, value: str) -> None:
    context = from_headers({header: value}, NAMES, "10.0.2.9", GATEWAY)
    assert value not in str(context._asdict())


def test_outbound_headers_append_this_hop_to_forwarded_for() -> None:
    context = from_headers(
        {"x-forwarded-for": "203.0.113.7", "x-uid": "u-1", "x-internal-id-token": "tok"},
        NAMES,
        "10.0.0.5",
        GATEWAY,
    )
    headers = outbound_headers(context, NAMES)
    assert headers["x-forwarded-for"] == "203.0.113.7, 10.0.0.5"
    assert headers["x-trace-id"] == context.trace_id
    assert headers["x-uid"] == "u-1"
    assert headers["x-internal-id-token"] == "tok"
    assert "x-internal-id-token" not in outbound_headers(context, NAMES, internal=False)


def test_outbound_forwarded_for_starts_with_the_peer_when_none_came_in() -> None:
    context = from_headers({}, NAMES, "10.0.0.5")
    assert outbound_headers(context, NAMES)["x-forwarded-for"] == "10.0.0.5"


@given(
    st.dictionaries(st.sampled_from(sorted(NAMES.model_dump().values())), st.text()),
    st.one_of(st.none(), st.ip_addresses().map(str)),
)
def test_any_header_values_give_a_safe_context(headers: dict[str, str], peer: str | None) -> None:
    """Whatever arrives, from anyone, the context holds only printable, bounded values and
    valid ids."""
    context = from_headers(headers, NAMES, peer, TrustedPeers(["0.0.0.0/0", "::/0"]))
    assert HEX32.fullmatch(context.trace_id)
    for value in context._asdict().values():
        if isinstance(value, bool):
            continue
        if value is not None:
            assert value.isprintable()
            assert "\r" not in value
            assert "\n" not in value
    out = outbound_headers(context, NAMES)
    for name, value in out.items():
        assert value.isprintable(), name
    if context.forwarded_for and peer:
        assert out["x-forwarded-for"].count(",") == context.forwarded_for.count(",") + 1


def test_middleware_sets_context_for_the_request_only_and_echoes_ids() -> None:
    app = FastAPI()
    kiban.Service(
        app, Settings(headers=NAMES, trusted_proxies=["10.0.0.0/8"]), security=NoSecurity()
    )
    seen: list[propagation.RequestContext | None] = []

    @app.get("/")
    async def index() -> dict[str, str]:
        seen.append(propagation.current())
        return {}

    with TestClient(app, client=("10.0.0.3", 5000)) as client:
        response = client.get(
            "/", headers={"x-trace-id": "4bf92f3577b34da6a3ce929d0e0e4736", "x-uid": "u-7"}
        )
    assert response.headers["x-trace-id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert HEX32.fullmatch(response.headers["x-request-id"])
    assert seen[0] is not None
    assert seen[0].uid == "u-7"
    assert propagation.current() is None


def test_repeated_forwarded_for_headers_are_joined_in_order() -> None:
    app = FastAPI()
    kiban.Service(app, Settings(trusted_proxies=["10.0.0.0/8"]), security=NoSecurity())
    seen: list[str | None] = []

    @app.get("/")
    async def index() -> dict[str, str]:
        context = propagation.current()
        seen.append(context.forwarded_for if context else None)
        return {}

    with TestClient(app, client=("10.0.0.3", 5000)) as client:
        client.get("/", headers=[("x-forwarded-for", "1.1.1.1"), ("x-forwarded-for", "2.2.2.2")])
    assert seen == ["1.1.1.1, 2.2.2.2"]


def test_a_served_request_from_an_untrusted_peer_keeps_none_of_its_claims() -> None:
    app = FastAPI()
    kiban.Service(app, Settings(trusted_proxies=["10.0.0.0/8"]), security=NoSecurity())
    seen: list[propagation.RequestContext | None] = []

    @app.get("/")
    async def index() -> dict[str, str]:
        seen.append(propagation.current())
        return {}

    with TestClient(app, client=("198.51.100.4", 5000)) as client:
        response = client.get("/", headers=ASSERTED)
    [context] = seen
    assert context is not None
    assert context.uid is None
    assert context.user_ip == "198.51.100.4"
    assert response.headers["x-trace-id"] == context.trace_id != "4bf92f3577b34da6a3ce929d0e0e4736"


def test_every_response_carries_the_security_headers() -> None:
    app = FastAPI()
    kiban.Service(app, Settings(), security=NoSecurity())
    with TestClient(app) as client:
        response = client.get("/missing")
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["referrer-policy"] == "no-referrer"
