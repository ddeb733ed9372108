"""Two real services on loopback: one trace, one context, across the call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port, identity
from tests.receivers import OTLPReceiver

pytestmark = pytest.mark.process

SERVER, CLIENT = 2, 3
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture(params=["http", "grpc"])
def system(
    request: pytest.FixtureRequest, otlp: OTLPReceiver, spawn: Any, tmp_path: Path
) -> tuple[Any, Any]:
    """members and orders; orders calls members over HTTP or over gRPC."""
    grpc_port = free_port()
    members = spawn(
        "services.members.app:create_app",
        OTLP_ENDPOINT=otlp.grpc_endpoint,
        DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/members.db",
        TRUSTED_PROXIES="127.0.0.1",  # as in `make run`: the gateway and orders, on loopback
        GRPC_PORT=str(grpc_port),
    )
    over_grpc = {"MEMBERS_GRPC": f"127.0.0.1:{grpc_port}"} if request.param == "grpc" else {}
    orders = spawn(
        "services.orders.app:create_app",
        OTLP_ENDPOINT=otlp.grpc_endpoint,
        MEMBERS_URL=members.url,
        DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/orders.db",
        TRUSTED_PROXIES="127.0.0.1",
        **over_grpc,
    )
    members.transport = request.param
    return members, orders


def test_one_trace_and_one_context_across_two_services(
    otlp: OTLPReceiver, system: tuple[Any, Any]
) -> None:
    members, orders = system
    member = httpx.post(
        f"{members.url}/members", json={"email": "ada@example.com", "name": "Ada"}
    ).json()
    response = httpx.post(
        f"{orders.url}/orders",
        json={"member_id": member["id"], "item": "tea", "quantity": 2},
        headers={
            "x-trace-id": TRACE,
            "x-uid": str(member["id"]),
            "user-agent": "ShopApp/3.1 (iPhone)",
            "x-user-ip": "203.0.113.7",
            "x-forwarded-for": "203.0.113.7, 198.51.100.2",
            **identity(str(member["id"])),
        },
    )
    assert response.status_code == 201, response.text
    assert response.headers["x-trace-id"] == TRACE

    def complete() -> Any:
        """The trace once both server spans and orders' call are in."""
        found = [s for s in otlp.spans() if s.trace_id == TRACE]
        servers = {s.resource["service.name"] for s in found if s.kind == SERVER}
        calls = [
            s
            for s in found
            if s.kind == CLIENT
            and ("http.request.method" in s.attributes or "rpc.system" in s.attributes)
        ]
        return found if servers == {"orders", "members"} and calls else None

    spans = otlp.wait_for(complete)
    orders_server = next(
        s for s in spans if s.kind == SERVER and s.resource["service.name"] == "orders"
    )
    # orders' call to members (its SQL statements are client spans too).
    orders_client = next(
        s
        for s in spans
        if s.kind == CLIENT
        and s.resource["service.name"] == "orders"
        and ("http.request.method" in s.attributes or "rpc.system" in s.attributes)
    )
    members_server = next(
        s for s in spans if s.kind == SERVER and s.resource["service.name"] == "members"
    )
    assert orders_client.parent_span_id == orders_server.span_id
    assert members_server.parent_span_id == orders_client.span_id
    over_grpc = members.transport == "grpc"
    assert members_server.name == (
        "members.v1.Members/GetMember" if over_grpc else "GET /members/{member_id}"
    )

    members.stop()
    orders.stop()
    orders_line = next(line for line in orders.lines() if line.get("path") == "/orders")
    members_path = "/members.v1.Members/GetMember" if over_grpc else f"/members/{member['id']}"
    members_line = next(line for line in members.lines() if line.get("path") == members_path)
    for line in (orders_line, members_line):
        assert line["trace_id"] == TRACE
        assert line["uid"] == str(member["id"])
        assert line["user_agent"] == "ShopApp/3.1 (iPhone)"
        assert line["user_ip"] == "203.0.113.7"
    assert orders_line["forwarded_for"] == "203.0.113.7, 198.51.100.2"
    assert members_line["forwarded_for"] == "203.0.113.7, 198.51.100.2, 127.0.0.1"
    assert members_line["span_id"] == members_server.span_id


def test_a_members_outage_is_a_503_problem_and_shows_in_readiness(
    system: tuple[Any, Any],
) -> None:
    members, orders = system
    assert members.stop() == 0
    response = httpx.post(
        f"{orders.url}/orders",
        json={"member_id": 1, "item": "tea", "quantity": 1},
        headers=identity("1"),
    )
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    readiness = httpx.get(f"{orders.url}/health/readiness").json()
    assert readiness["checks"]["members"]["status"] == "fail"
