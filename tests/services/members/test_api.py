"""The members sample service on SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from services.members.app import MembersSettings, create_app
from tests.conftest import API_KEY, Lines, bearer, closed_port, identity

ADMIN = bearer("ops", "members:admin")
READER = bearer("svc", "members:read")


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgres_url", marks=pytest.mark.integration),
        pytest.param("mariadb_url", marks=pytest.mark.integration),
    ]
)
def client(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TestClient]:
    url = (
        f"sqlite+aiosqlite:///{tmp_path}/members.db"
        if request.param == "sqlite"
        else request.getfixturevalue(request.param)
    )
    with TestClient(create_app(MembersSettings(database_url=url))) as test_client:
        yield test_client


def register(client: TestClient, email: str, name: str = "Ada") -> dict[str, object]:
    response = client.post("/members", json={"email": email, "name": name})
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def test_register_then_get(client: TestClient) -> None:
    created = register(client, "Ada@Example.com", "Ada Lovelace")
    assert created["email"] == "ada@example.com"
    assert created["name"] == "Ada Lovelace"
    fetched = client.get(f"/members/{created['id']}", headers=READER)
    assert fetched.status_code == 200
    assert fetched.json() == created


def test_email_is_unique_whatever_its_case(client: TestClient) -> None:
    register(client, "grace@example.com")
    response = client.post("/members", json={"email": "GRACE@example.com", "name": "G"})
    assert response.status_code == 409
    assert response.headers["content-type"] == "application/problem+json"


def test_update_name_and_email_with_conflicts_refused(client: TestClient) -> None:
    first = register(client, "a@example.com")
    register(client, "b@example.com")
    response = client.patch(f"/members/{first['id']}", json={"name": "Alice"}, headers=ADMIN)
    assert response.status_code == 200
    assert response.json()["name"] == "Alice"
    assert (
        client.patch(
            f"/members/{first['id']}", json={"email": "b@example.com"}, headers=ADMIN
        ).status_code
        == 409
    )
    assert client.get(f"/members/{first['id']}", headers=READER).json()["email"] == "a@example.com"
    assert client.patch("/members/999999", json={"name": "x"}, headers=ADMIN).status_code == 404


def test_list_is_paginated_in_id_order(client: TestClient) -> None:
    ids = [register(client, f"m{i}@example.com")["id"] for i in range(5)]
    page = client.get("/members", params={"limit": 2, "offset": 1}, headers=API_KEY).json()
    assert page["total"] == 5
    assert [item["id"] for item in page["items"]] == ids[1:3]
    assert page["limit"] == 2
    assert page["offset"] == 1
    assert client.get("/members", params={"offset": 10}, headers=API_KEY).json()["items"] == []


@pytest.mark.parametrize(
    "body",
    [
        {"email": "not-an-email", "name": "x"},
        {"email": "a@example.com", "name": ""},
        {"email": "a@example.com", "name": "   "},
        {"email": "not an@example.com", "name": "x"},
        {"email": "a@example.com", "name": "x" * 101},
        {"email": "a@example.com"},
        {"email": "a@example.com", "name": "x", "admin": True},
    ],
)
def test_invalid_registrations_are_422(client: TestClient, body: dict[str, object]) -> None:
    response = client.post("/members", json=body)
    assert response.status_code == 422
    assert response.json()["errors"]


def test_unknown_member_is_404_problem(client: TestClient) -> None:
    response = client.get("/members/424242", headers=READER)
    assert response.status_code == 404
    assert response.json()["detail"] == "No member has id 424242."


def test_readiness_reports_the_database(client: TestClient) -> None:
    response = client.get("/health/readiness")
    assert response.status_code == 200
    assert response.json()["checks"]["database"]["status"] == "ok"


@pytest.mark.integration
def test_database_down_means_not_ready_and_503_but_still_alive(lines: Lines) -> None:
    url = f"postgresql+asyncpg://postgres:pw-42@127.0.0.1:{closed_port()}/test"
    app = create_app(MembersSettings(database_url=url, migrate_on_start=False))
    with TestClient(app) as client:
        assert client.get("/health/liveness").status_code == 200
        readiness = client.get("/health/readiness")
        assert readiness.status_code == 503
        assert readiness.json()["checks"]["database"]["status"] == "fail"
        response = client.get("/members/1", headers=READER)
        assert response.status_code == 503
        assert response.headers["content-type"] == "application/problem+json"
    assert "pw-42" not in lines.text()


def test_every_request_wrote_one_access_line(lines: Lines, tmp_path: Path) -> None:
    settings = MembersSettings(database_url=f"sqlite+aiosqlite:///{tmp_path}/m.db")
    with TestClient(create_app(settings)) as client:
        register(client, "z@example.com")
        client.get("/members/1", headers={"x-uid": "u-5", **READER})
        client.get("/members/2", headers=READER)
    access = lines.access()
    assert [(line["method"], line["route"], line["status"]) for line in access] == [
        ("POST", "/members", 201),
        ("GET", "/members/{member_id}", 200),
        ("GET", "/members/{member_id}", 404),
    ]
    assert access[1]["uid"] == "svc"  # the token's subject; the x-uid header is not believed
    assert {line["service"] for line in access} == {"members"}


def test_each_route_has_its_declared_security(client: TestClient) -> None:
    created = register(client, "sec@example.com")
    member = f"/members/{created['id']}"
    # Registration is public; reading one member needs members:read or an identity token.
    assert client.get(member).status_code == 401
    assert client.get(member, headers=bearer("svc")).status_code == 403
    assert client.get(member, headers=READER).status_code == 200
    # A member reads themselves only; someone else's record is not there for them.
    assert client.get(member, headers=identity(str(created["id"]))).status_code == 200
    other = client.get(member, headers=identity(str(created["id"] + 1)))
    assert other.status_code == 404
    assert "sec@example.com" not in other.text
    # Updating falls back to the API default: an admin JWT.
    assert client.patch(member, json={"name": "X"}, headers=READER).status_code == 403
    assert client.patch(member, json={"name": "X"}, headers=ADMIN).status_code == 200
    # Listing takes an API key, and only a known one.
    assert client.get("/members").status_code == 401
    assert client.get("/members", headers={"x-api-key": "nope"}).status_code == 401
    assert client.get("/members", headers=API_KEY).status_code == 200
    # "My profile" is the identity token's subject.
    me = client.get("/members/me", headers=identity(str(created["id"])))
    assert me.json()["email"] == "sec@example.com"
    assert client.get("/members/me", headers=READER).status_code == 401
