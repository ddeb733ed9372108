"""The items API: behaviour, errors and security at every level."""

from __future__ import annotations

import uuid

from starlette.testclient import TestClient

from tests.conftest import API_KEY, credentials

WRITER = credentials("items:write")


def test_create_then_read_publicly(client: TestClient) -> None:
    name = f"pen-{uuid.uuid4().hex[:8]}"
    created = client.post("/items", json={"name": name, "description": "blue"}, headers=WRITER)
    assert created.status_code == 201, created.text
    item = client.get(f"/items/{created.json()['id']}")
    assert item.status_code == 200
    assert item.json()["name"] == name


def test_duplicate_names_conflict(client: TestClient) -> None:
    name = f"cup-{uuid.uuid4().hex[:8]}"
    client.post("/items", json={"name": name}, headers=WRITER)
    again = client.post("/items", json={"name": name}, headers=WRITER)
    assert again.status_code == 409
    assert again.headers["content-type"] == "application/problem+json"


def test_only_the_owner_or_an_admin_deletes_an_item(client: TestClient) -> None:
    name = f"mug-{uuid.uuid4().hex[:8]}"
    item = client.post("/items", json={"name": name}, headers=WRITER).json()
    other = credentials("items:write", subject="someone-else")
    assert client.delete(f"/items/{item['id']}", headers=other).status_code == 404
    assert client.delete(f"/items/{item['id']}", headers=WRITER).status_code == 204
    assert client.get(f"/items/{item['id']}").status_code == 404
    again = client.post("/items", json={"name": name}, headers=WRITER).json()
    admin = credentials("items:write", "items:admin", subject="ops")
    assert client.delete(f"/items/{again['id']}", headers=admin).status_code == 204


def test_security_levels(client: TestClient) -> None:
    assert client.post("/items", json={"name": "x"}).status_code == 401
    assert client.post("/items", json={"name": "x"}, headers=credentials()).status_code == 403
    assert client.get("/items").status_code == 401
    assert client.get("/items", headers={"x-api-key": API_KEY}).status_code == 200


def test_bad_input_is_a_problem(client: TestClient) -> None:
    response = client.post("/items", json={"name": ""}, headers=WRITER)
    assert response.status_code == 422
    assert response.json()["errors"][0]["pointer"] == "#/body/name"
    assert client.get("/items/999999").status_code == 404


def test_health(client: TestClient) -> None:
    assert client.get("/health/liveness").json() == {"status": "ok"}
    readiness = client.get("/health/readiness").json()
    assert readiness["checks"]["database"]["status"] == "ok"
