"""kiban dev's dashboard: an OTLP/HTTP receiver with a bounded window and a JSON API.

The services' real exporters (the OTel SDK's OTLP/HTTP span and metric exporters,
kiban's log exporter) send to a dashboard served by a real uvicorn on loopback.
"""

from __future__ import annotations

import gzip
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from fastapi import FastAPI
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

import kiban
from kiban import dev
from kiban._config import ConfigError
from kiban._dashboard._otlp import Histogram, Log, Span
from kiban._dashboard._runner import service_env
from kiban.security import NoSecurity
from kiban.testing import client
from tests.conftest import bearer, free_port

ROOT = Path(__file__).resolve().parent.parent


class Dashboard:
    def __init__(self, store: dev.Store, url: str) -> None:
        self.store = store
        self.url = url

    def get(self, path: str, **options: Any) -> httpx.Response:
        return httpx.get(self.url + path, **options)

    def wait_for(self, path: str, predicate: Any, timeout: float = 15) -> Any:
        deadline = time.monotonic() + timeout
        body = None
        while time.monotonic() < deadline:
            body = self.get(path).json()
            if predicate(body):
                return body
            time.sleep(0.05)
        raise AssertionError(f"{path} never matched: {body}")


@pytest.fixture
def dashboard() -> Iterator[Dashboard]:
    store = dev.Store(max_spans=20_000, max_logs=20_000)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            dev.create_app(store, poll=0.05),
            port=port,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=1,
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield Dashboard(store, f"http://127.0.0.1:{port}")
    server.should_exit = True
    thread.join(10)


def exporting_service(dashboard: Dashboard, name: str = "shop") -> kiban.Service:
    settings = kiban.Settings(
        service_name=name,
        service_version="2.0.1",
        otlp_endpoint=dashboard.url,
        otlp_protocol="http/protobuf",
        otlp_logs=True,
        trace_export_delay=0.05,
        metrics_export_interval=0.2,
        log_format="json",
    )
    app = FastAPI()
    service = kiban.Service(app, settings=settings, security=NoSecurity())

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        kiban.log.info("item read", item_id=item_id)
        if item_id == 0:
            kiban.log.error("item zero is broken")
            raise RuntimeError("broken")
        return {"id": item_id}

    return service


def test_a_service_exports_traces_logs_and_metrics_over_otlp_http(dashboard: Dashboard) -> None:
    service = exporting_service(dashboard)
    with client(service.app, raise_server_exceptions=False) as http:
        ok = http.get("/items/7", headers={"x-uid": "u-1"})
        failed = http.get("/items/0")
    assert ok.status_code == 200
    assert failed.status_code == 500
    trace_id = ok.headers["x-trace-id"]
    trace = dashboard.wait_for(f"/api/traces/{trace_id}", lambda body: body.get("logs"))
    (server,) = trace["spans"]
    assert server["name"] == "GET /items/{item_id}"
    assert server["kind"] == "server"
    assert server["service"] == "shop"
    assert server["attributes"]["http.response.status_code"] == 200
    messages = [log["msg"] for log in trace["logs"]]
    assert "item read" in messages
    (access,) = [log for log in trace["logs"] if log["attributes"].get("log") == "access"]
    assert access["span_id"] == server["span_id"]
    assert access["attributes"]["route"] == "/items/{item_id}"
    assert access["level"] == "info"
    # The failed request: its span is an error, its error line is an error-level record.
    failing = dashboard.get(f"/api/traces/{failed.headers['x-trace-id']}").json()
    assert failing["errors"] == 1
    errors = dashboard.get("/api/logs", params={"level": "error", "service": "shop"}).json()
    assert "item zero is broken" in [log["msg"] for log in errors["logs"]]
    requests = dashboard.get("/api/requests", params={"status": "5xx"}).json()["requests"]
    assert [(r["route"], r["status"]) for r in requests] == [("/items/{item_id}", 500)]
    # Metrics: the service's request histogram gives its count, errors and percentiles.
    (shop,) = dashboard.wait_for(
        "/api/services", lambda body: body["services"] and body["services"][0]["requests"] >= 2
    )["services"]
    assert shop["version"] == "2.0.1"
    assert shop["requests"] == 2
    assert shop["p50_ms"] is not None
    assert shop["p99_ms"] >= shop["p50_ms"]
    assert shop["managed"] is False


def test_the_log_exporter_never_holds_a_request_when_the_collector_is_down(
    tmp_path: Path,
) -> None:
    from kiban._otlplogs import LogExporter

    settings = kiban.Settings(
        otlp_endpoint=f"http://127.0.0.1:{free_port()}",  # nothing listens
        otlp_protocol="http/protobuf",
        trace_export_delay=0.05,
    )
    exporter = LogExporter(settings, {"service.name": "lonely"}, max_queue=100)
    started = time.perf_counter()
    for number in range(1_000):
        exporter.offer(orjson.dumps({"msg": f"line {number}", "level": "info"}))
    assert time.perf_counter() - started < 0.5  # queued, never sent inline
    exporter.shutdown()
    assert exporter.sent == 0
    assert exporter.dropped == 1_000  # 900 past the queue, the rest failed: counted


def test_logs_keep_their_trace_severity_and_fields(dashboard: Dashboard) -> None:
    from kiban._otlplogs import LogExporter

    settings = kiban.Settings(
        otlp_endpoint=dashboard.url, otlp_protocol="http/protobuf", trace_export_delay=0.05
    )
    exporter = LogExporter(settings, {"service.name": "billing", "service.version": "1"})
    trace_id, span_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    exporter.offer(
        orjson.dumps(
            {
                "time": "2026-12-07T10:00:00.5Z",
                "level": "warning",
                "msg": "card declined",
                "trace_id": trace_id,
                "span_id": span_id,
                "amount": 12.5,
                "tries": 3,
                "retry": True,
                "card": {"last4": "4242"},
            }
        )
    )
    exporter.offer(b"a console line, not JSON")
    exporter.shutdown()
    logs = dashboard.wait_for("/api/logs", lambda body: len(body["logs"]) == 2)["logs"]
    console, declined = logs
    assert console["msg"] == "a console line, not JSON"
    assert declined["level"] == "warning"
    assert declined["trace_id"] == trace_id
    assert declined["span_id"] == span_id
    assert declined["time"] == 1796637600500000000
    assert declined["attributes"] == {
        "amount": 12.5,
        "tries": 3,
        "retry": True,
        "card": '{"last4":"4242"}',
    }


def export_span(dashboard: Dashboard, **attributes: Any) -> None:
    """One span through the OTel SDK's own OTLP/HTTP exporter."""
    provider = TracerProvider(resource=Resource.create({"service.name": "sdk"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(f"{dashboard.url}/v1/traces")))
    with provider.get_tracer("t").start_as_current_span("op", attributes=attributes):
        pass
    provider.shutdown()


def test_credentials_never_reach_a_page(dashboard: Dashboard) -> None:
    secret = "s3cr3t-value-never-shown"
    export_span(
        dashboard,
        **{
            "http.request.header.authorization": secret,
            "api_key": secret,
            "db.password": secret,
            "session.token": secret,
            "http.route": "/kept",
        },
    )
    trace = dashboard.wait_for("/api/traces", lambda body: body["traces"])["traces"][0]
    body = dashboard.get(f"/api/traces/{trace['trace_id']}").text
    assert secret not in body
    assert "/kept" in body
    for path in ("/api/traces", "/api/logs", "/api/requests", "/api/map", "/api/services"):
        assert secret not in dashboard.get(path).text


def test_bad_export_requests_get_problem_details(dashboard: Dashboard) -> None:
    url = f"{dashboard.url}/v1/traces"
    protobuf = {"content-type": "application/x-protobuf"}
    garbage = httpx.post(url, content=b"\xff\xff\xff not protobuf", headers=protobuf)
    assert garbage.status_code == 400
    assert garbage.headers["content-type"] == "application/problem+json"
    json_body = httpx.post(url, json={"resourceSpans": []})
    assert json_body.status_code == 400
    assert "http/protobuf" in json_body.json()["detail"]
    bad_gzip = httpx.post(url, content=b"nope", headers={**protobuf, "content-encoding": "gzip"})
    assert bad_gzip.status_code == 400
    # A gzip body, as the SDK's exporters send with OTEL_EXPORTER_OTLP_COMPRESSION=gzip.
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    empty = gzip.compress(ExportTraceServiceRequest().SerializeToString())
    ok = httpx.post(url, content=empty, headers={**protobuf, "content-encoding": "gzip"})
    assert ok.status_code == 200
    assert dashboard.get("/v1/nothing").status_code == 404
    assert dashboard.get("/static/../_web.py").status_code == 404


def test_only_loopback_names_are_served(dashboard: Dashboard) -> None:
    """DNS rebinding: a page on evil.example resolving to 127.0.0.1 is refused."""
    refused = dashboard.get("/api/services", headers={"host": "evil.example:8000"})
    assert refused.status_code == 421
    for host in ("localhost:8000", "127.0.0.1", "[::1]:8000"):
        assert dashboard.get("/api/services", headers={"host": host}).status_code == 200


def test_a_restart_needs_the_dashboard_header(dashboard: Dashboard) -> None:
    """A cross-site form can POST but cannot add a header: no restart from another page."""
    state = dashboard.store.service("members")
    state.managed = True
    forged = httpx.post(f"{dashboard.url}/api/services/members/restart")
    assert forged.status_code == 403
    unknown = httpx.post(
        f"{dashboard.url}/api/services/nobody/restart", headers={"x-kiban-dev": "1"}
    )
    assert unknown.status_code == 404


def test_live_events_announce_each_change(dashboard: Dashboard) -> None:
    with httpx.stream("GET", f"{dashboard.url}/api/events", timeout=10) as events:
        lines = events.iter_lines()
        assert next(lines) == "event: change"
        first = int(next(lines).removeprefix("data: "))
        export_span(dashboard, route="/x")
        while not (line := next(lines)).startswith("data: "):
            pass
        assert int(line.removeprefix("data: ")) > first


def test_the_pages_are_served_locally(dashboard: Dashboard) -> None:
    page = dashboard.get("/")
    assert page.headers["content-type"].startswith("text/html")
    for asset in ("/static/app.js", "/static/app.css"):
        assert asset in page.text
        assert dashboard.get(asset).status_code == 200
    assert "http://" not in page.text.replace("http://www.w3.org", "")  # no CDN
    assert "https://" not in dashboard.get("/static/app.js").text


# -- the window -------------------------------------------------------------------------


def span(
    trace: str,
    span_id: str,
    parent: str = "",
    *,
    service: str = "a",
    kind: str = "server",
    start: int = 0,
    end: int = 1_000_000,
    status: str = "unset",
    **attributes: Any,
) -> Span:
    return Span(trace, span_id, parent, "op", kind, service, start, end, status, "", attributes)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 5)), max_size=200), st.integers(1, 50))
def test_the_window_keeps_the_latest_and_its_index_matches(
    items: list[tuple[int, int]], size: int
) -> None:
    store = dev.Store(max_spans=size, max_logs=size)
    spans = [span(f"{trace:032x}", f"{n:016x}") for n, (trace, _) in enumerate(items)]
    store.add_spans(spans)
    store.add_logs(
        Log(n, "a", "info", "m", f"{trace:032x}", "", {}) for n, (_, trace) in enumerate(items)
    )
    assert list(store.spans) == spans[-size:]
    assert len(store.logs) == min(size, len(items))
    for trace in {each.trace_id for each in spans}:
        expected = [each for each in spans[-size:] if each.trace_id == trace]
        found = store.trace(trace)
        assert [entry["span_id"] for entry in (found or {}).get("spans", [])] == [
            each.span_id for each in expected
        ]


def test_the_map_pairs_client_and_server_spans_and_names_dependencies() -> None:
    store = dev.Store()
    store.service("orders").url = "http://127.0.0.1:8002"
    store.service("members").url = "http://127.0.0.1:8001"
    trace = "1" * 32
    store.add_spans(
        [
            span(trace, "a1", service="orders"),
            span(trace, "c1", "a1", service="orders", kind="client", end=3_000_000),
            span(trace, "s1", "c1", service="members"),
            span(trace, "c2", "a1", service="orders", kind="client", status="error"),
            span(trace, "s2", "c2", service="members", status="error"),
            span(
                trace, "d1", "s1", service="members", kind="client", **{"db.system": "postgresql"}
            ),
            # A call to a service whose server span is not traced (a probe): its address.
            span(
                "2" * 32,
                "p1",
                service="orders",
                kind="client",
                **{"server.address": "127.0.0.1", "server.port": 8001},
            ),
            span(
                "3" * 32, "x1", service="orders", kind="client", **{"server.address": "api.example"}
            ),
        ]
    )
    graph = store.service_map()
    edges = {(edge["source"], edge["target"]): edge for edge in graph["edges"]}
    assert edges["orders", "members"]["calls"] == 3
    assert edges["orders", "members"]["errors"] == 1
    assert edges["orders", "members"]["kind"] == "service"
    assert edges["members", "postgresql"]["kind"] == "dependency"
    assert edges["orders", "api.example"]["calls"] == 1
    kinds = {node["id"]: node["kind"] for node in graph["nodes"]}
    assert kinds == {
        "orders": "service",
        "members": "service",
        "postgresql": "dependency",
        "api.example": "dependency",
    }


def test_rates_and_percentiles_come_from_the_request_histogram() -> None:
    store = dev.Store()
    bounds = (0.005, 0.01, 0.025, 0.05, 0.1)
    store.add_histograms(
        [Histogram("a", "1.0", 1_000_000_000, 10, 0, bounds, [10, 0, 0, 0, 0, 0], True)]
    )
    store.add_histograms(
        [Histogram("a", "1.0", 3_000_000_000, 110, 10, bounds, [10, 0, 90, 0, 0, 10], True)]
    )
    state = store.services["a"].as_dict(time.time())
    assert state["rate"] == 50.0  # 100 requests in 2 s
    assert state["error_rate"] == 0.1  # of the last interval's
    assert 10 < state["p50_ms"] < 25  # the last interval's: 90 of 100 in (10, 25] ms
    assert state["p99_ms"] == 100.0  # in +Inf: its lower bound
    # Delta exports add up; a counter that went back means the service restarted.
    store.add_histograms([Histogram("b", "", 1, 4, 1, bounds, [4, 0, 0, 0, 0, 0], False)])
    store.add_histograms([Histogram("b", "", 2, 2, 0, bounds, [2, 0, 0, 0, 0, 0], False)])
    assert store.services["b"].as_dict(time.time())["requests"] == 6
    store.add_histograms(
        [Histogram("a", "1.0", 9_000_000_000, 3, 0, bounds, [3, 0, 0, 0, 0, 0], True)]
    )
    assert store.services["a"].as_dict(time.time())["rate"] is None


def test_requests_filter_and_hide_probes_unless_asked() -> None:
    store = dev.Store()

    def access(service: str, path: str, status: int, uid: str | None = None) -> Log:
        fields = {
            "log": "access",
            "method": "GET",
            "path": path,
            "route": path,
            "status": status,
            "latency_s": 0.01,
            "uid": uid,
        }
        return Log(time.time_ns(), service, "info", "", "ab" * 16, "", fields)

    store.add_logs(
        [
            access("members", "/members/1", 200, "1"),
            access("members", "/health/readiness", 200),
            access("orders", "/orders", 503, "1"),
            access("orders", "/orders", 404, "2"),
        ]
    )
    assert len(store.requests()) == 3
    assert len(store.requests(probes=True)) == 4
    assert [r["status"] for r in store.requests(status="5xx")] == [503]
    assert [r["status"] for r in store.requests(status="404")] == [404]
    assert [r["path"] for r in store.requests(uid="1")] == ["/orders", "/members/1"]
    assert [r["service"] for r in store.requests(service="members")] == ["members"]
    assert store.requests(route="orders", limit=1)[0]["status"] == 404


def test_every_page_answers_fast_with_ten_thousand_spans(dashboard: Dashboard) -> None:
    store = dashboard.store
    services = ["gateway", "orders", "members", "billing"]
    spans, logs = [], []
    for number in range(2_500):
        trace = f"{number:032x}"
        parent = ""
        for depth, name in enumerate(services):
            server = f"{number:08x}{depth:04x}0000"
            client_span = f"{number:08x}{depth:04x}0001"
            spans.append(span(trace, server, parent, service=name, start=depth, end=10 - depth))
            parent = client_span
            logs.append(
                Log(
                    number,
                    name,
                    "info",
                    "handled",
                    trace,
                    server,
                    {"log": "access", "path": f"/{name}", "status": 200, "uid": str(number)},
                )
            )
    store.add_spans(spans)
    store.add_logs(logs)
    assert len(store.spans) == 10_000
    paths = [
        "/api/services",
        "/api/requests",
        "/api/requests?uid=42",
        "/api/logs?q=handled",
        "/api/traces",
        f"/api/traces/{42:032x}",
        "/api/map",
        "/api/status",
    ]
    for path in paths:
        started = time.perf_counter()
        assert dashboard.get(path).status_code == 200
        assert time.perf_counter() - started < 0.5, path


# -- kiban.toml -------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "kiban.toml"
    path.write_text(text)
    return path


def test_kiban_toml_declares_the_services(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[dev]
port = 8100
[dev.env]
TRUSTED_PROXIES = "127.0.0.1"
[[dev.services]]
name = "members"
app = "services.members.app:create_app"
port = 8101
[[dev.services]]
name = "orders"
app = "services.orders.app:create_app"
port = 8102
env = { MEMBERS_URL = "{members.url}", DEBUG = true }
""",
    )
    config = dev.load(path, environ={"ORDERS_PORT": "9102"})
    assert config.url == "http://127.0.0.1:8100"
    members, orders = config.services
    assert (members.port, orders.port) == (8101, 9102)  # the shell moves a port
    env = service_env(orders, config, {"LOG_LEVEL": "debug", "HTTP_PORT": "1", "DEBUG": "no"})
    assert env["MEMBERS_URL"] == "http://127.0.0.1:8101"
    assert env["TRUSTED_PROXIES"] == "127.0.0.1"
    assert env["LOG_LEVEL"] == "debug"
    assert env["DEBUG"] == "no"  # the shell wins over the file...
    assert env["HTTP_PORT"] == "9102"  # ...but not over what kiban dev decides
    assert env["OTLP_ENDPOINT"] == "http://127.0.0.1:8100"
    assert env["OTLP_PROTOCOL"] == "http/protobuf"
    assert env["OTLP_LOGS"] == "true"
    assert env["SERVICE_NAME"] == "orders"
    assert kiban.Settings(
        _env_file=None,
        **{  # type: ignore[call-arg]
            key.lower(): value for key, value in env.items() if key.startswith("OTLP_")
        },
    ).otlp_logs


def test_a_wrong_kiban_toml_names_every_mistake(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[dev]
port = 70000
host = "0.0.0.0"
[[dev.services]]
name = "Members"
port = "x"
[[dev.services]]
name = "orders"
app = "no-colon"
port = 8002
env = { MEMBERS_URL = "{billing.url}" }
""",
    )
    with pytest.raises(ConfigError) as error:
        dev.load(path, environ={})
    message = str(error.value)
    for mistake in (
        "dev.port",
        "dev.host 0.0.0.0 is not loopback",
        "dev.services[0].name",
        "dev.services[0].port",
        "dev.services[0]: either app",
        "dev.services[1].app",
        "{billing...} names no service",
    ):
        assert mistake in message, mistake
    with pytest.raises(ConfigError, match=r"no .*kiban\.toml"):
        dev.load(tmp_path / "missing" / "kiban.toml")


def test_a_remote_dashboard_must_be_asked_for(tmp_path: Path) -> None:
    text = '[dev]\nhost = "0.0.0.0"\n[[dev.services]]\nname = "a"\napp = "m:app"\nport = 8001\n'
    with pytest.raises(ConfigError, match="allow_remote"):
        dev.load(write(tmp_path, text), environ={})
    allowed = dev.load(
        write(tmp_path, text.replace("[dev]\n", "[dev]\nallow_remote = true\n")), environ={}
    )
    assert allowed.host == "0.0.0.0"


def test_kiban_dev_refuses_a_non_loopback_bind_from_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kiban._cli import main

    path = write(tmp_path, '[dev]\n[[dev.services]]\nname = "a"\napp = "m:app"\nport = 8001\n')
    assert main(["dev", "--config", str(path), "--host", "0.0.0.0"]) == 2
    assert "not loopback" in capsys.readouterr().err


def test_the_sample_system_is_declared_in_kiban_toml() -> None:
    config = dev.load(ROOT / "kiban.toml", environ={})
    assert [spec.name for spec in config.services] == ["members", "orders"]
    assert config.host == "127.0.0.1"


def test_a_bearer_token_is_never_in_the_window(dashboard: Dashboard) -> None:
    """The services redact what they log; the dashboard redacts credential names too."""
    service = exporting_service(dashboard, "vault")
    headers = bearer("u-9", "items:read")
    token = headers["authorization"].split()[1]
    with client(service.app) as http:
        response = http.get("/items/3", params={"token": token, "api_key": token}, headers=headers)
    trace = dashboard.wait_for(
        f"/api/traces/{response.headers['x-trace-id']}", lambda body: body.get("logs")
    )
    assert trace["spans"]
    for path in ("/api/logs", "/api/requests", f"/api/traces/{trace['trace_id']}"):
        assert token not in dashboard.get(path).text


@pytest.mark.process
def test_kiban_dev_stops_when_a_service_cannot_start(tmp_path: Path) -> None:
    """A start-up failure ends kiban dev (status 1) and the services it started."""
    import subprocess
    import sys

    from tests.conftest import read_until

    path = write(
        tmp_path,
        f"""
[dev]
port = {free_port()}
[[dev.services]]
name = "hello"
app = "tests.apps.hello:app"
port = {free_port()}
[[dev.services]]
name = "broken"
app = "tests.apps.hello:no_such_app"
port = {free_port()}
""",
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "kiban", "dev", "--config", str(path)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        output = read_until(process.stdout, "before it was ready", timeout=60)
        assert process.wait(timeout=30) == 1, output
    finally:
        process.kill()
    assert "kiban dev: broken exited with status 2 before it was ready" in output
    hello = dev.load(path).services[0]
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{hello.url}/health/liveness", timeout=1)
