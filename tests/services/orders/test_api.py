"""The orders service against a real members process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from services.orders.app import OrdersSettings, create_app
from tests.conftest import Lines, closed_port, identity, token

USER = identity("1")  # member 1: the first registered in each test
OPERATOR = {"x-internal-id-token": token("internal", "ops", "orders:admin")}

pytestmark = pytest.mark.process


@pytest.fixture
def members(spawn: Any, tmp_path: Path) -> Any:
    return spawn(
        "services.members.app:create_app", DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/members.db"
    )


@pytest.fixture
def orders(members: Any, tmp_path: Path) -> Iterator[TestClient]:
    settings = OrdersSettings(
        database_url=f"sqlite+aiosqlite:///{tmp_path}/orders.db", members_url=members.url
    )
    with TestClient(create_app(settings)) as client:
        yield client


def register(members: Any, email: str) -> int:
    response = httpx.post(f"{members.url}/members", json={"email": email, "name": "Ada"})
    assert response.status_code == 201
    return int(response.json()["id"])


def test_place_get_and_list_orders(members: Any, orders: TestClient) -> None:
    member_id = register(members, "ada@example.com")
    assert member_id == 1
    placed = orders.post(
        "/orders", json={"member_id": member_id, "item": "tea", "quantity": 2}, headers=USER
    )
    assert placed.status_code == 201, placed.text
    body = placed.json()
    assert body["member_name"] == "Ada"
    assert orders.get(f"/orders/{body['id']}", headers=USER).json()["item"] == "tea"
    page = orders.get("/orders", params={"member_id": member_id}, headers=USER).json()
    assert page["total"] == 1
    assert orders.get("/orders", headers=USER).json()["total"] == 1  # one's own by default


def test_a_member_sees_and_places_only_their_own_orders(members: Any, orders: TestClient) -> None:
    """OWASP API1: member 2's token got member 1's order, list, email and could order
    on member 1's behalf."""
    ada, bob = register(members, "ada@example.com"), register(members, "bob@example.com")
    as_ada, as_bob = identity(str(ada)), identity(str(bob))
    order = orders.post(
        "/orders", json={"member_id": ada, "item": "tea", "quantity": 1}, headers=as_ada
    ).json()
    assert orders.get(f"/orders/{order['id']}", headers=as_bob).status_code == 404
    assert orders.get("/orders", params={"member_id": ada}, headers=as_bob).status_code == 403
    assert orders.get("/orders", headers=as_bob).json()["total"] == 0
    on_behalf = orders.post(
        "/orders", json={"member_id": ada, "item": "tea", "quantity": 9}, headers=as_bob
    )
    assert on_behalf.status_code == 403
    assert on_behalf.headers["content-type"] == "application/problem+json"
    email = httpx.get(f"{members.url}/members/{ada}", headers=as_bob)
    assert email.status_code == 404
    assert "ada@example.com" not in email.text
    # An operator sees everyone's.
    assert orders.get(f"/orders/{order['id']}", headers=OPERATOR).status_code == 200
    assert orders.get("/orders", headers=OPERATOR).json()["total"] == 1


def test_an_unknown_member_is_refused_with_404(orders: TestClient) -> None:
    response = orders.post(
        "/orders", json={"member_id": 4242, "item": "tea", "quantity": 1}, headers=OPERATOR
    )
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["detail"] == "No member has id 4242."
    assert orders.get("/orders", headers=USER).json()["total"] == 0


def test_domain_metrics_are_on_the_metrics_endpoint(
    members: Any, spawn: Any, tmp_path: Path
) -> None:
    orders = spawn(
        "services.orders.app:create_app",
        MEMBERS_URL=members.url,
        DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/orders.db",
    )
    member_id = register(members, "m@example.com")
    with httpx.Client(base_url=orders.url, headers=USER) as client:
        client.post(
            "/orders", json={"member_id": member_id, "item": "tea", "quantity": 1}, headers=USER
        )
        client.post(
            "/orders", json={"member_id": 999, "item": "tea", "quantity": 1}, headers=OPERATOR
        )
        text = client.get("/metrics").text
    assert "orders_total{" in text
    assert 'outcome="placed"' in text
    assert 'outcome="failed"' in text
    assert "order_duration_seconds_bucket" in text


def test_members_down_means_503_problem_and_a_degraded_readiness(
    tmp_path: Path, lines: Lines
) -> None:
    settings = OrdersSettings(
        database_url=f"sqlite+aiosqlite:///{tmp_path}/orders.db",
        members_url=f"http://127.0.0.1:{closed_port()}",
    )
    with TestClient(create_app(settings)) as client:
        response = client.post(
            "/orders", json={"member_id": 1, "item": "tea", "quantity": 1}, headers=USER
        )
        readiness = client.get("/health/readiness")
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    assert readiness.status_code == 200
    assert readiness.json()["status"] == "degraded"
    assert readiness.json()["checks"]["members"]["status"] == "fail"
