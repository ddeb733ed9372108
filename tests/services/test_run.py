"""``make run``: the sample system starts on embedded defaults and says how to call it."""

from __future__ import annotations

import signal
import subprocess

import httpx
import pytest

from tests.conftest import (
    API_KEY,
    free_port,
    identity,
    read_until,
    start_sample_system,
    stop_sample_system,
)

pytestmark = pytest.mark.process


def start(port: int, orders_port: int) -> subprocess.Popen[str]:
    return start_sample_system(
        {"MEMBERS": port, "ORDERS": orders_port, "KIBAN_DEV": free_port(), "GRPC": free_port()}
    )


def read_banner(process: subprocess.Popen[str]) -> str:
    return read_until(process.stdout, "a problem+json 401")


def test_sample_system_starts_serves_and_stops_cleanly() -> None:
    port, orders_port = free_port(), free_port()
    process = start(port, orders_port)
    try:
        banner = read_banner(process)
        assert f"http://127.0.0.1:{port}" in banner
        assert "curl" in banner
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/health/readiness").status_code == 200
        listing = httpx.get(f"{url}/members", headers=API_KEY)
        assert listing.status_code == 200
        assert "items" in listing.json()
        assert f"http://127.0.0.1:{orders_port}" in banner
        member = httpx.post(
            f"{url}/members", json={"email": f"run-{port}@example.com", "name": "Run"}
        ).json()
        order = httpx.post(
            f"http://127.0.0.1:{orders_port}/orders",
            json={"member_id": member["id"], "item": "tea", "quantity": 1},
            headers=identity(str(member["id"])),
        )
        assert order.status_code == 201, order.text
    finally:
        assert stop_sample_system(process, signal.SIGINT) == 0


def test_sigterm_stops_the_services_too() -> None:
    port, orders_port = free_port(), free_port()
    process = start(port, orders_port)
    try:
        assert "a problem+json 401" in read_banner(process)
    finally:
        assert stop_sample_system(process, signal.SIGTERM) == 0
    for service_port in (port, orders_port):
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{service_port}/health/liveness")
