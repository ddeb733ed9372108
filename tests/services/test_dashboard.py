"""``make run``'s dashboard, end to end: the real sample system, a real headless Chromium.

The system is started as a developer starts it (``python -m services.run``, which is
``kiban dev`` on kiban.toml); requests go to the services with curl-equivalent calls;
the dashboard's JSON API and each rendered page are checked, and a screenshot of each
page is saved under ``.artifacts/`` (docs/dashboard.png is one of them).
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.browser import Browser
from tests.conftest import (
    bearer,
    free_port,
    identity,
    read_until,
    start_sample_system,
    stop_sample_system,
)

pytestmark = pytest.mark.process

TRACE = "5cf92f3577b34da6a3ce929d0e0e4799"


@dataclass
class System:
    dashboard: str
    members: str
    orders: str
    banner: str
    process: subprocess.Popen[str]

    def api(self, path: str, **params: Any) -> Any:
        response = httpx.get(f"{self.dashboard}{path}", params=params, timeout=5)
        assert response.status_code == 200, response.text
        return response.json()

    def wait_for(self, path: str, predicate: Any, timeout: float = 20, **params: Any) -> Any:
        deadline = time.monotonic() + timeout
        body = None
        while time.monotonic() < deadline:
            response = httpx.get(f"{self.dashboard}{path}", params=params, timeout=5)
            body = response.json()
            if response.status_code == 200 and predicate(body):
                return body
            time.sleep(0.2)
        raise AssertionError(f"{path} never matched: {json.dumps(body)[:3000]}")


@pytest.fixture(scope="module")
def system() -> Iterator[System]:
    ports = {name: free_port() for name in ("KIBAN_DEV", "MEMBERS", "ORDERS", "GRPC")}
    process = start_sample_system(ports)
    assert process.stdout is not None
    banner = read_until(process.stdout, "a problem+json 401")
    # The rest of the output is read away, so the services never block on a full pipe.
    drain = subprocess.Popen(["cat"], stdin=process.stdout, stdout=subprocess.DEVNULL)
    try:
        assert "a problem+json 401" in banner, banner
        yield System(
            f"http://127.0.0.1:{ports['KIBAN_DEV']}",
            f"http://127.0.0.1:{ports['MEMBERS']}",
            f"http://127.0.0.1:{ports['ORDERS']}",
            banner,
            process,
        )
    finally:
        try:
            code = stop_sample_system(process, signal.SIGINT)
        finally:
            drain.wait(10)
    assert code == 0


@pytest.fixture(scope="module")
def traffic(system: System) -> dict[str, Any]:
    """What a developer would do after make run: a member, an order, a failing call."""
    member = httpx.post(
        f"{system.members}/members",
        json={"email": f"dash-{time.time_ns()}@example.com", "name": "Dash"},
    ).json()
    user = identity(str(member["id"]))
    order = httpx.post(
        f"{system.orders}/orders",
        json={"member_id": member["id"], "item": "tea", "quantity": 2},
        headers={**user, "x-trace-id": TRACE},
    )
    assert order.status_code == 201, order.text
    admin = bearer("ops", "members:admin", "members:read")
    assert httpx.get(f"{system.members}/members/{member['id']}", headers=admin).status_code == 200
    missing = httpx.post(
        f"{system.orders}/orders",
        json={"member_id": 999_999, "item": "tea", "quantity": 1},
        headers=user,
    )
    assert missing.status_code >= 400
    return {"member": member, "user": user, "admin": admin, "missing": missing}


def test_the_dashboard_url_is_printed_first(system: System) -> None:
    first = system.banner.splitlines()[0]
    assert first == f"kiban dev: dashboard {system.dashboard}"
    assert f"dashboard {system.dashboard}" in system.banner.split("kiban sample system is up")[1]


def test_the_api_shows_one_trace_across_both_services(
    system: System, traffic: dict[str, Any]
) -> None:
    trace = system.wait_for(
        f"/api/traces/{TRACE}",
        lambda body: (
            {"members", "orders"} <= {span["service"] for span in body["spans"]}
            and {"members", "orders"}
            <= {log["service"] for log in body["logs"] if log["attributes"].get("log") == "access"}
        ),
    )
    spans = {(span["service"], span["kind"], span["name"]) for span in trace["spans"]}
    assert ("orders", "server", "POST /orders") in spans
    assert ("members", "server", "GET /members/{member_id}") in spans
    # members' server span is the child of orders' client span: one waterfall.
    by_id = {span["span_id"]: span for span in trace["spans"]}
    members_server = next(
        span for span in trace["spans"] if span["service"] == "members" and span["kind"] == "server"
    )
    caller = by_id[members_server["parent_id"]]
    assert (caller["service"], caller["kind"]) == ("orders", "client")
    assert members_server["depth"] > caller["depth"]
    access = [log for log in trace["logs"] if log["attributes"].get("log") == "access"]
    assert {log["service"] for log in access} == {"members", "orders"}
    uid = str(traffic["member"]["id"])
    assert {log["attributes"]["uid"] for log in access} == {uid}
    # Requests: filtered by uid and by trace; the map: orders calls members.
    mine = system.api("/api/requests", uid=uid, trace_id=TRACE)["requests"]
    assert {(r["service"], r["route"]) for r in mine} == {
        ("orders", "/orders"),
        ("members", "/members/{member_id}"),
    }
    graph = system.wait_for(
        "/api/map",
        lambda body: any(
            (edge["source"], edge["target"]) == ("orders", "members") for edge in body["edges"]
        ),
    )
    edge = next(e for e in graph["edges"] if (e["source"], e["target"]) == ("orders", "members"))
    assert edge["calls"] >= 1
    services = system.wait_for(
        "/api/services",
        lambda body: (
            all(s["requests"] >= 1 for s in body["services"])
            and all(s["readiness"].get("status") == "ok" for s in body["services"])
        ),
    )["services"]
    by_name = {service["name"]: service for service in services}
    assert set(by_name) == {"members", "orders"}
    assert by_name["orders"]["readiness"]["checks"]["members"]["status"] == "ok"
    assert by_name["members"]["url"] == system.members
    assert by_name["members"]["liveness"] == "ok"
    assert by_name["members"]["managed"] is True
    assert by_name["orders"]["p99_ms"] is not None


def test_no_token_is_ever_shown(system: System, traffic: dict[str, Any]) -> None:
    secret = "dashboard-secret-" + "x" * 12
    httpx.get(f"{system.members}/members", params={"token": secret, "api_key": secret})
    system.wait_for("/api/requests", lambda body: body["requests"], route="/members")
    tokens = [
        traffic["user"]["x-internal-id-token"],
        traffic["admin"]["authorization"].split()[1],
        secret,
    ]
    pages = ["/api/services", "/api/requests?limit=2000", "/api/logs?limit=2000", "/api/traces",
             f"/api/traces/{TRACE}", "/api/map"]  # fmt: skip
    for path in pages:
        body = httpx.get(system.dashboard + path).text
        for token in tokens:
            assert token not in body, path


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    chrome = Browser(tmp_path_factory.mktemp("chromium"))
    yield chrome
    chrome.close()


def show(browser: Browser, system: System, page: str) -> None:
    """Open ``page`` and wait until it has rendered (not the page shown before it)."""
    with contextlib.suppress(RuntimeError):  # no page loaded yet
        browser.evaluate("document.querySelector('main').dataset.state = 'stale'")
    browser.goto(f"{system.dashboard}/#/{page}")
    name = page.split("/")[0].split("?")[0]
    browser.wait_for(
        f"document.querySelector('main').dataset.page === {json.dumps(name)}"
        " && document.querySelector('main').dataset.state === 'ready'"
    )


def test_every_page_renders_in_a_real_browser(
    system: System, traffic: dict[str, Any], browser: Browser
) -> None:
    show(browser, system, "services")
    browser.wait_for(
        "['members', 'orders'].every(name => document.querySelector("
        "`tr[data-service=${name}] [data-readiness=ok]`))"
    )
    checks = browser.evaluate(
        "[...document.querySelectorAll('tr[data-service=orders] [data-check]')]"
        ".map(node => node.dataset.check)"
    )
    assert checks == ["database", "members"]
    assert browser.evaluate("document.querySelectorAll('button[data-restart]').length") == 2
    browser.screenshot("dashboard-services")

    show(browser, system, "requests")
    routes = browser.wait_for(
        "[...document.querySelectorAll('tbody tr')].map(row => row.textContent).join('\\n')"
    )
    assert "/orders" in routes
    assert "/members/{member_id}" in routes
    browser.screenshot("dashboard-requests")

    show(browser, system, f"trace/{TRACE}")
    rows = browser.wait_for(
        "[...document.querySelectorAll('#waterfall .span-row')]"
        ".map(row => [row.dataset.service, row.dataset.kind])"
    )
    assert ["orders", "server"] in rows
    assert ["orders", "client"] in rows
    assert ["members", "server"] in rows
    assert browser.evaluate("document.querySelectorAll('tr[data-log]').length") >= 2
    browser.screenshot("dashboard-trace")

    show(browser, system, "logs?level=warning")
    browser.screenshot("dashboard-logs")
    show(browser, system, "logs")
    assert browser.wait_for("document.querySelectorAll('tbody tr').length") > 5

    show(browser, system, "map")
    edge = browser.wait_for(
        "(e => e && [e.dataset.calls, e.dataset.errors])"
        "(document.querySelector('g.edge[data-source=orders][data-target=members]'))"
    )
    assert int(edge[0]) >= 1
    nodes = browser.evaluate(
        "[...document.querySelectorAll('g.node')].map(node => node.dataset.id).sort()"
    )
    assert {"members", "orders"} <= set(nodes)
    browser.screenshot("dashboard-map")


def test_a_new_request_appears_live(system: System, browser: Browser) -> None:
    show(browser, system, "requests")
    caller = f"live-{time.time_ns()}"  # the uid column shows the token's subject
    rows = "[...document.querySelectorAll('tbody tr')].map(row => row.textContent)"
    assert not [row for row in browser.evaluate(rows) if caller in row]
    response = httpx.get(f"{system.members}/members/1", headers=bearer(caller, "members:read"))
    assert response.status_code in (200, 404)
    # No navigation: the page refetches when the server-sent events say something changed.
    browser.wait_for(f"{rows}.some(row => row.includes({json.dumps(caller)}))")


def test_a_service_restarts_from_the_dashboard(system: System, browser: Browser) -> None:
    before = {s["name"]: s for s in system.api("/api/services")["services"]}["members"]
    show(browser, system, "services")
    browser.evaluate("document.querySelector('button[data-restart=members]').click()")
    after = system.wait_for(
        "/api/services",
        lambda body: any(
            s["name"] == "members" and s["restarts"] == 1 and s["readiness"].get("status") == "ok"
            for s in body["services"]
        ),
        timeout=40,
    )
    members = {s["name"]: s for s in after["services"]}["members"]
    assert members["uptime_s"] < before["uptime_s"] + 40
    assert httpx.get(f"{system.members}/health/readiness").status_code == 200
