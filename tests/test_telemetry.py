"""Traces, metrics and error reports reach real receivers: OTLP, Prometheus, Sentry."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from starlette.testclient import TestClient

import kiban
from kiban._config import Settings
from kiban.security import NoSecurity
from tests.conftest import IN_CI, Silent, free_port
from tests.receivers import OTLPReceiver, SentryReceiver, running

HELLO = "tests.apps.hello:app"
PARENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT_SPAN = "b7ad6b7169203331"
SERVER, CLIENT, INTERNAL = 2, 3, 1  # OTLP span kinds


@pytest.fixture
def sentry() -> Iterator[SentryReceiver]:
    yield from running(SentryReceiver())


@pytest.mark.process
@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_server_span_follows_semantic_conventions_and_its_parent(
    otlp: OTLPReceiver, spawn: Any, protocol: str
) -> None:
    endpoint = otlp.grpc_endpoint if protocol == "grpc" else otlp.http_endpoint
    service = spawn(
        HELLO,
        TRUSTED_PROXIES="127.0.0.1",  # the caller is a service of ours
        OTLP_ENDPOINT=endpoint,
        OTLP_PROTOCOL=protocol,
        SERVICE_NAME="hello",
        SERVICE_VERSION="1.2.3",
    )
    response = httpx.get(
        f"{service.url}/hello/ada",
        headers={"traceparent": f"00-{PARENT_TRACE}-{PARENT_SPAN}-01"},
    )
    assert response.headers["x-trace-id"] == PARENT_TRACE
    spans = otlp.wait_for(
        lambda: [s for s in otlp.spans() if s.trace_id == PARENT_TRACE and s.kind == SERVER]
    )
    (server,) = spans
    assert server.name == "GET /hello/{name}"
    assert server.parent_span_id == PARENT_SPAN
    assert server.attributes["http.request.method"] == "GET"
    assert server.attributes["http.route"] == "/hello/{name}"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["url.path"] == "/hello/ada"
    assert server.resource["service.name"] == "hello"
    assert server.resource["service.version"] == "1.2.3"
    # The handler's own span, opened with the plain OTel API, is the server span's child.
    child = otlp.wait_for(lambda: [s for s in otlp.spans() if s.name == "compose greeting"])[0]
    assert child.trace_id == PARENT_TRACE
    assert child.parent_span_id == server.span_id
    # Logs and the access line carry the same ids as the spans.
    service.stop()
    greeting = next(line for line in service.lines() if line.get("msg") == "greeting")
    assert greeting["trace_id"] == PARENT_TRACE
    assert greeting["span_id"] == child.span_id
    access = next(line for line in service.lines() if line.get("path") == "/hello/ada")
    assert access["trace_id"] == PARENT_TRACE
    assert access["span_id"] == server.span_id


@pytest.mark.process
def test_one_server_span_per_request_and_the_trace_header_becomes_the_trace_id(
    otlp: OTLPReceiver, spawn: Any
) -> None:
    service = spawn(HELLO, OTLP_ENDPOINT=otlp.grpc_endpoint, TRUSTED_PROXIES="127.0.0.1")
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    with httpx.Client() as client:
        for _ in range(3):
            client.get(f"{service.url}/hello/x", headers={"x-trace-id": trace_id})
        client.get(f"{service.url}/boom")
    server_spans = otlp.wait_for(
        lambda: (
            (found := [s for s in otlp.spans() if s.kind == SERVER]) and len(found) >= 4 and found
        )
    )
    time.sleep(0.5)
    server_spans = [s for s in otlp.spans() if s.kind == SERVER]
    assert len(server_spans) == 4  # no per-message (receive/send) spans, nothing doubled
    assert [s.trace_id for s in server_spans[:3]] == [trace_id] * 3
    assert all(s.parent_span_id == "" for s in server_spans[:3])
    failed = server_spans[3]
    assert failed.attributes["http.response.status_code"] == 500
    assert failed.status_code == 2  # ERROR


@pytest.mark.process
def test_unsampled_requests_export_nothing_but_keep_their_trace_ids(
    otlp: OTLPReceiver, spawn: Any
) -> None:
    service = spawn(HELLO, OTLP_ENDPOINT=otlp.grpc_endpoint, TRACE_SAMPLE_RATIO="0")
    response = httpx.get(f"{service.url}/hello/x")
    time.sleep(1.5)
    service.stop()
    assert otlp.spans() == []
    access = next(line for line in service.lines() if line.get("path") == "/hello/x")
    assert access["trace_id"] == response.headers["x-trace-id"]


@pytest.mark.process
def test_metrics_are_exported_over_otlp(otlp: OTLPReceiver, spawn: Any) -> None:
    service = spawn(HELLO, OTLP_ENDPOINT=otlp.grpc_endpoint, METRICS_EXPORT_INTERVAL="0.5")
    httpx.get(f"{service.url}/hello/x")
    names = otlp.wait_for(
        lambda: (
            otlp.metric_names() >= {"http.server.request.duration", "greetings_total"}
            and otlp.metric_names()
        )
    )
    assert "http.server.active_requests" in names


@pytest.mark.process
def test_the_spans_still_queued_at_sigterm_reach_the_collector(
    otlp: OTLPReceiver, spawn: Any
) -> None:
    # Batches wait 60 s: only the shutdown's flush can send these.
    service = spawn(HELLO, OTLP_ENDPOINT=otlp.grpc_endpoint, TRACE_EXPORT_DELAY="60")
    with httpx.Client(base_url=service.url) as client:
        for number in range(5):
            client.get(f"/hello/{number}")
    assert otlp.spans() == []
    assert service.stop() == 0
    assert len([span for span in otlp.spans() if span.kind == SERVER]) == 5


@pytest.mark.process
@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_a_collector_that_does_not_answer_does_not_hold_the_shutdown(
    spawn: Any, silent: Silent, protocol: str
) -> None:
    """Fault drill: the collector accepts connections and never answers. The SDK's
    own exit handler used to wait for it, batch after batch: 10 to 34 s after SIGTERM,
    past the documented bound and a pod's grace period."""
    service = spawn(
        HELLO,
        OTLP_ENDPOINT=f"http://127.0.0.1:{silent.port}",
        OTLP_PROTOCOL=protocol,
        TRACE_EXPORT_BATCH="16",
        METRICS_EXPORT_INTERVAL="0.5",
        SHUTDOWN_CLEANUP_TIMEOUT="1",
    )
    with httpx.Client(base_url=service.url) as client:
        for number in range(200):
            assert client.get(f"/hello/{number}").status_code == 200
    began = time.monotonic()
    code = service.stop()
    took = time.monotonic() - began
    assert took < 1 + 2  # drain 0 + nothing in flight + the cleanup timeout + 2 s
    assert code == 3  # a cleanup was abandoned: the telemetry flush, and it says so
    stopped = next(line for line in service.lines() if line.get("msg") == "stopped")
    assert stopped["abandoned"] == ["cleanup telemetry flush"]


def _items(settings: Settings) -> tuple[FastAPI, kiban.Service]:
    """An app serving ``GET /items/{item_id}`` under kiban with ``settings``."""
    app = FastAPI()
    service = kiban.Service(app, settings, security=NoSecurity())

    @app.get("/items/{item_id}")
    async def get(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    return app, service


def test_metrics_endpoint_serves_standard_http_metrics() -> None:
    app, _ = _items(Settings())

    with TestClient(app) as client:
        client.get("/items/1")
        client.get("/items/2")
        client.get("/nope")
        text = client.get("/metrics").text
    assert "# TYPE http_server_request_duration_seconds histogram" in text
    line = next(
        line
        for line in text.splitlines()
        if line.startswith("http_server_request_duration_seconds_count")
        and 'http_route="/items/{item_id}"' in line
    )
    assert line.endswith(" 2.0")
    assert 'http_response_status_code="404"' in text
    assert "http_server_active_requests" in text


def test_requests_carry_the_semantic_conventions_error_type_scheme_and_protocol() -> None:
    from kiban.testing import capture_spans

    app = FastAPI()
    service = kiban.Service(app, Settings(), security=NoSecurity())
    spans = capture_spans(service)

    @app.get("/fine")
    async def fine() -> dict[str, bool]:
        return {"fine": True}

    @app.get("/bug")
    async def bug() -> None:
        raise RuntimeError("a bug")

    @app.get("/down")
    async def down() -> None:
        raise kiban.Problem(503, "Down for now.")

    with TestClient(app, raise_server_exceptions=False) as client:
        for path in ("/fine", "/bug", "/down"):
            client.get(path)
        text = client.get("/metrics").text
    by_route = {
        span.attributes["http.route"]: span.attributes
        for span in spans.get_finished_spans()
        if span.attributes and "http.route" in span.attributes
    }
    assert "error.type" not in by_route["/fine"]
    assert by_route["/bug"]["error.type"] == "RuntimeError"  # the exception's class
    assert by_route["/down"]["error.type"] == "503"  # a 5xx answered on purpose: its status
    assert by_route["/fine"]["network.protocol.version"] == "1.1"
    counts = [
        line
        for line in text.splitlines()
        if line.startswith("http_server_request_duration_seconds_count")
    ]
    (failed,) = [line for line in counts if 'http_route="/bug"' in line]
    assert 'error_type="RuntimeError"' in failed
    assert 'url_scheme="http"' in failed
    assert 'network_protocol_version="1.1"' in failed
    (served,) = [line for line in counts if 'http_route="/fine"' in line]
    assert 'error_type=""' in served  # absent: Prometheus reads an empty label as none


def test_a_method_a_client_made_up_is_other_and_mints_no_series() -> None:
    """Any token is a method to some servers (granian): as a label, a client could
    make one series (and kiban one cached entry) per request."""
    from kiban.testing import capture_spans

    app = FastAPI()
    service = kiban.Service(app, Settings(), security=NoSecurity())
    spans = capture_spans(service)

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    with TestClient(app) as client:
        for number in range(30):
            assert client.request(f"M{number}XYZ", "/items/1").status_code == 405
        assert client.get("/items/1").status_code == 200
        text = client.get("/metrics").text
    counts = [
        line
        for line in text.splitlines()
        if line.startswith("http_server_request_duration_seconds_count")
    ]
    assert len(counts) == 2
    (other,) = [line for line in counts if 'http_request_method="_OTHER"' in line]
    assert other.endswith(" 30.0")
    assert len(service.telemetry._attributes) == 2
    made_up = [span for span in spans.get_finished_spans() if span.name.startswith("HTTP")]
    assert len(made_up) == 30
    assert made_up[0].name == "HTTP /items/{item_id}"
    assert made_up[0].attributes is not None
    assert made_up[0].attributes["http.request.method"] == "_OTHER"
    assert made_up[0].attributes["http.request.method_original"] == "M0XYZ"


def test_metrics_has_the_runtime_and_the_apps_own_prometheus_metrics() -> None:
    from prometheus_client import Counter

    app = FastAPI()
    kiban.Service(app, Settings(), security=NoSecurity())
    legacy = Counter("legacy_jobs", "Jobs counted by the app with prometheus_client.")
    try:
        legacy.inc(3)
        with TestClient(app) as client:
            client.get("/health/liveness")
            text = client.get("/metrics").text
    finally:
        from prometheus_client import REGISTRY

        REGISTRY.unregister(legacy)
    for name in (
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "python_gc_collections_total",
        "process_thread_count",
        "kiban_event_loop_lag_seconds",
        "legacy_jobs_total 3.0",
    ):
        assert name in text, name
    names = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(names) == len(set(names))  # no family twice: a scraper would refuse it


def test_a_bug_is_recorded_on_its_server_span() -> None:
    app = FastAPI()
    service = kiban.Service(app, Settings(), security=NoSecurity())
    exporter = InMemorySpanExporter()
    service.telemetry.tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("kaboom")

    @app.get("/teapot")
    async def teapot() -> None:
        raise kiban.Problem(418)

    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/boom").status_code == 500
        assert client.get("/teapot").status_code == 418
    spans = {span.name: span for span in exporter.get_finished_spans()}
    (event,) = spans["GET /boom"].events
    assert event.name == "exception"
    assert event.attributes["exception.type"] == "RuntimeError"
    assert spans["GET /teapot"].events == ()  # an answer, not a bug


@pytest.fixture
def prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        if IN_CI:
            pytest.fail("prometheus is not installed (Debian package 'prometheus')")
        pytest.skip("prometheus is not installed")
    return binary


@pytest.mark.process
def test_a_real_prometheus_scrapes_the_request_counter_and_its_exemplars(
    spawn: Any, prometheus_binary: str, tmp_path: Path
) -> None:
    service = spawn(HELLO)
    with httpx.Client() as client:
        for name in ("a", "b", "c"):
            assert client.get(f"{service.url}/hello/{name}").status_code == 200
    target = service.url.removeprefix("http://")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        f"scrape_configs:\n  - job_name: hello\n    static_configs:\n"
        f"      - targets: ['{target}']\n"
    )
    port = free_port()
    prometheus = subprocess.Popen(
        [
            prometheus_binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path}/data",
            f"--web.listen-address=127.0.0.1:{port}",
            # It then asks for OpenMetrics, the format that carries exemplars.
            "--enable-feature=exemplar-storage",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    query = 'http_server_request_duration_seconds_count{http_route="/hello/{name}"}'
    try:
        deadline = time.monotonic() + 60  # Prometheus starts slowly on a busy machine
        value = None
        while time.monotonic() < deadline and value is None:
            time.sleep(0.5)
            try:
                answer = httpx.get(
                    f"http://127.0.0.1:{port}/api/v1/query", params={"query": query}
                ).json()
            except httpx.TransportError:
                continue
            results = answer.get("data", {}).get("result", [])
            if results:
                value = float(results[0]["value"][1])
        assert value == 3.0
        greetings = httpx.get(
            f"http://127.0.0.1:{port}/api/v1/query", params={"query": "greetings_total"}
        ).json()["data"]["result"]
        assert float(greetings[0]["value"][1]) == 3.0
        # The duration buckets carry exemplars: the trace ids of the requests.
        exemplars = httpx.get(
            f"http://127.0.0.1:{port}/api/v1/query_exemplars",
            params={
                "query": 'http_server_request_duration_seconds_bucket{http_route="/hello/{name}"}',
                "start": time.time() - 600,
                "end": time.time() + 60,
            },
        ).json()["data"]
        found = {
            exemplar["labels"]["trace_id"]
            for series in exemplars
            for exemplar in series["exemplars"]
        }
        traces = {
            line["trace_id"]
            for line in service.lines()
            if line.get("log") == "access" and line["path"].startswith("/hello/")
        }
        assert found
        assert found <= traces
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=10)
    started = next(line for line in service.lines() if line.get("msg") == "started")
    assert started["telemetry"] == "in process (spans not exported) and /metrics"


@pytest.mark.process
def test_unhandled_exceptions_reach_sentry_tagged_and_4xx_do_not(
    sentry: SentryReceiver, spawn: Any
) -> None:
    service = spawn(
        HELLO, SENTRY_DSN=sentry.dsn, SENTRY_ENVIRONMENT="test", TRUSTED_PROXIES="127.0.0.1"
    )
    with httpx.Client() as client:
        teapot = client.get(f"{service.url}/teapot")
        boom = client.get(f"{service.url}/boom", headers={"x-uid": "u-77"})
    assert teapot.status_code == 418
    assert boom.status_code == 500
    deadline = time.monotonic() + 10
    while not sentry.events and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    (event,) = sentry.events
    assert event["exception"]["values"][-1]["value"] == "the hello service broke"
    assert event["tags"]["trace_id"] == boom.headers["x-trace-id"]
    assert event["tags"]["http.route"] == "/boom"
    assert event["tags"]["uid"] == "u-77"
    assert event["environment"] == "test"
    started = next(line for line in service.lines() if line.get("msg") == "started")
    assert started["sentry"] is True
    assert "publickey" not in service.output.read_text()


@pytest.mark.process
def test_the_error_reports_still_queued_at_sigterm_reach_sentry(spawn: Any) -> None:
    # A slow Sentry: the first report holds the SDK's sender for a second, so the
    # second is still queued in the process when SIGTERM comes right after it.
    with contextlib.contextmanager(running)(SentryReceiver(delay=1.0)) as sentry:
        service = spawn(HELLO, SENTRY_DSN=sentry.dsn)
        with httpx.Client(base_url=service.url) as client:
            assert client.get("/boom").status_code == 500
            deadline = time.monotonic() + 10
            while not sentry.events and time.monotonic() < deadline:
                time.sleep(0.05)
            assert client.get("/boom").status_code == 500
        assert service.stop() == 0
        assert len(sentry.events) == 2


def test_handlers_add_attributes_events_and_exceptions_to_the_server_span() -> None:
    exported = InMemorySpanExporter()
    app = FastAPI()
    service = kiban.Service(app, Settings(), security=NoSecurity())
    service.telemetry.tracer_provider.add_span_processor(SimpleSpanProcessor(exported))

    @app.get("/orders/{order_id}")
    async def get(order_id: int) -> dict[str, int]:
        span = trace.get_current_span()
        span.set_attribute("order.id", order_id)
        span.add_event("loaded", {"rows": 1})
        span.record_exception(ValueError("stale cache"))
        return {"id": order_id}

    with TestClient(app) as client:
        client.get("/orders/7")
    (server,) = [s for s in exported.get_finished_spans() if s.kind is trace.SpanKind.SERVER]
    assert server.name == "GET /orders/{order_id}"
    assert server.attributes is not None
    # What the handler set sits beside what kiban records for every request.
    assert {
        key: server.attributes[key]
        for key in (
            "order.id",
            "http.request.method",
            "url.path",
            "url.scheme",
            "http.response.status_code",
            "http.route",
        )
    } == {
        "order.id": 7,
        "http.request.method": "GET",
        "url.path": "/orders/7",
        "url.scheme": "http",
        "http.response.status_code": 200,
        "http.route": "/orders/{order_id}",
    }
    assert [event.name for event in server.events] == ["loaded", "exception"]
    assert server.events[1].attributes is not None
    assert server.events[1].attributes["exception.type"] == "ValueError"
    assert server.end_time is not None
    assert server.start_time is not None
    assert server.end_time >= server.start_time


def test_the_server_span_is_current_in_handlers_with_the_apis_own_context() -> None:
    """The span the request path makes current is the one exported, and its context is
    what the API's constructor makes of the same ids: valid, local, sampled."""
    exported = InMemorySpanExporter()
    app = FastAPI()
    service = kiban.Service(app, Settings(trusted_proxies=["10.0.0.0/8"]), security=NoSecurity())
    service.telemetry.tracer_provider.add_span_processor(SimpleSpanProcessor(exported))
    seen: list[trace.SpanContext] = []

    @app.get("/")
    async def index() -> dict[str, str]:
        seen.append(trace.get_current_span().get_span_context())
        return {}

    with TestClient(app, client=("10.0.0.3", 5000)) as client:
        for headers in (
            {},
            {"traceparent": f"00-{PARENT_TRACE}-{PARENT_SPAN}-01", "tracestate": "vendor=v1"},
        ):
            client.get("/", headers=headers)
    assert trace.get_current_span() is trace.INVALID_SPAN  # deactivated after each request
    for context, span in zip(seen, exported.get_finished_spans(), strict=True):
        rebuilt = trace.SpanContext(
            context.trace_id, context.span_id, False, context.trace_flags, context.trace_state
        )
        assert context == rebuilt
        assert context.is_valid
        assert not context.is_remote
        assert context.trace_flags.sampled
        assert span.context == context
    assert seen[1].trace_id == int(PARENT_TRACE, 16)
    assert seen[1].trace_state.get("vendor") == "v1"  # the caller's state goes on
    assert not seen[0].trace_state
    parent = exported.get_finished_spans()[1].parent
    assert parent is not None
    assert parent.span_id == int(PARENT_SPAN, 16)


class Watching(SpanProcessor):
    """A user's span processor: it records what it is shown, when."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.ended: list[tuple[str, Any]] = []

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        self.started.append(span.name)

    def on_end(self, span: ReadableSpan) -> None:
        self.ended.append((span.name, (span.attributes or {}).get("http.response.status_code")))


class OnlyPost(Sampler):
    """A user's sampler: keeps POST requests, drops the rest."""

    def should_sample(self, parent_context: Any, trace_id: int, name: str, *args: Any, **kw: Any):  # type: ignore[no-untyped-def]
        decision = Decision.RECORD_AND_SAMPLE if name == "POST" else Decision.DROP
        return SamplingResult(decision)

    def get_description(self) -> str:
        return "OnlyPost"


def test_a_users_span_processor_sees_the_server_span_start_and_end() -> None:
    """The server span is an SDK span: processors added by the user see on_start and on_end."""
    app, service = _items(Settings(trace_sample_ratio=1.0))
    watching = Watching()
    service.telemetry.tracer_provider.add_span_processor(watching)

    with TestClient(app) as client:
        assert client.get("/items/1").status_code == 200
    assert watching.started == ["GET"]  # the route is known only once it is matched
    assert watching.ended == [("GET /items/{item_id}", 200)]


def test_a_users_sampler_decides_the_server_spans() -> None:
    app = FastAPI()
    exported = InMemorySpanExporter()
    service = kiban.Service(app, security=NoSecurity(), sampler=OnlyPost())
    service.telemetry.tracer_provider.add_span_processor(SimpleSpanProcessor(exported))

    @app.api_route("/x", methods=["GET", "POST"])
    async def x() -> dict[str, str]:
        return {}

    with TestClient(app) as client:
        get = client.get("/x")
        post = client.post("/x")
    assert [span.name for span in exported.get_finished_spans()] == ["POST /x"]
    (span,) = exported.get_finished_spans()
    assert f"{span.context.trace_id:032x}" == post.headers["x-trace-id"]
    assert get.headers["x-trace-id"] != post.headers["x-trace-id"]  # still an id to log


def test_a_service_sends_its_server_spans_in_the_configured_batches() -> None:
    exporter = InMemorySpanExporter()
    batches: list[int] = []
    export = exporter.export

    def counted(spans: Any) -> Any:
        batches.append(len(spans))
        return export(spans)

    exporter.export = counted  # type: ignore[method-assign]
    settings = Settings(trace_export_batch=3, trace_export_delay=30, trace_export_queue=9)
    app, service = _items(settings)
    processor = service.telemetry.export_spans(exporter)

    with TestClient(app) as client:
        for number in range(7):
            client.get(f"/items/{number}")
    processor.force_flush()
    assert sum(batches) == 7
    assert max(batches) <= 3
    assert {span.name for span in exporter.get_finished_spans()} == {"GET /items/{item_id}"}
    processor.shutdown()


@pytest.mark.parametrize("mode", ["link", "follow", "ignore"])
def test_an_untrusted_callers_traceparent_is_a_link_not_a_parent(mode: str) -> None:
    """OTel's advice for public endpoints: a caller kiban does not trust neither picks
    the trace id nor decides sampling (flag 00 here); its span is kept as a link."""
    exported = InMemorySpanExporter()
    app = FastAPI()
    service = kiban.Service(app, Settings(trace_untrusted_parent=mode), security=NoSecurity())
    service.telemetry.tracer_provider.add_span_processor(SimpleSpanProcessor(exported))

    @app.get("/")
    async def index() -> dict[str, str]:
        return {}

    with TestClient(app, client=("198.51.100.4", 5000)) as client:
        response = client.get("/", headers={"traceparent": f"00-{PARENT_TRACE}-{PARENT_SPAN}-00"})
    spans = exported.get_finished_spans()
    if mode == "follow":  # the caller's decision: not sampled, its trace
        assert spans == ()
        assert response.headers["x-trace-id"] == PARENT_TRACE
        return
    (span,) = spans
    assert span.context.trace_id != int(PARENT_TRACE, 16)
    assert f"{span.context.trace_id:032x}" == response.headers["x-trace-id"]
    assert span.parent is None
    if mode == "link":
        (link,) = span.links
        assert link.context.trace_id == int(PARENT_TRACE, 16)
        assert link.context.span_id == int(PARENT_SPAN, 16)
    else:
        assert not span.links


def test_openmetrics_is_served_when_asked_with_the_sampled_requests_exemplars() -> None:
    app, _ = _items(Settings())

    with TestClient(app) as client:
        traces = {client.get("/items/1").headers["x-trace-id"] for _ in range(3)}
        plain = client.get("/metrics")
        open_metrics = client.get(
            "/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"}
        )
    assert plain.headers["content-type"].startswith("text/plain")
    assert " # {" not in plain.text  # the classic format has no exemplars
    assert open_metrics.headers["content-type"].startswith("application/openmetrics-text")
    assert open_metrics.text.count("# EOF") == 1  # kiban's metrics and the app's, one document
    buckets = [
        line
        for line in open_metrics.text.splitlines()
        if line.startswith("http_server_request_duration_seconds_bucket")
        and 'http_route="/items/{item_id}"' in line
        and " # {" in line
    ]
    assert buckets, open_metrics.text[:3000]
    assert {line.split('trace_id="')[1][:32] for line in buckets} <= traces


def test_unsampled_requests_leave_no_exemplar() -> None:
    app, _ = _items(Settings(trace_sample_ratio=0.0))

    with TestClient(app) as client:
        client.get("/items/1")
        text = client.get("/metrics", headers={"accept": "application/openmetrics-text"}).text
    assert "http_server_request_duration_seconds_bucket" in text
    assert " # {" not in text


def test_otel_metrics_are_named_by_the_prometheus_compatibility_rules() -> None:
    from opentelemetry.metrics import Observation
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.resources import Resource
    from prometheus_client import CollectorRegistry, generate_latest

    from kiban._prometheus import MetricsCollector

    reader = InMemoryMetricReader()
    resource = Resource.create({"service.name": "names"})
    meter = MeterProvider(resource=resource, metric_readers=[reader]).get_meter("test.scope", "1.2")
    meter.create_counter("orders.placed", unit="{order}").add(2, {"shop.id": "7"})
    meter.create_counter("payload.size", unit="By").add(512)
    meter.create_up_down_counter("queue.depth").add(3)
    meter.create_observable_gauge(
        "cache.hit_rate", callbacks=[lambda _: [Observation(0.5)]], unit="1"
    )
    meter.create_histogram("job.duration", unit="s").record(0.3)
    registry = CollectorRegistry()
    registry.register(MetricsCollector(reader, resource))
    text = generate_latest(registry).decode()
    scope = 'otel_scope_name="test.scope",otel_scope_schema_url="",otel_scope_version="1.2"'
    assert f'orders_placed_total{{{scope},shop_id="7"}} 2.0' in text
    assert "# TYPE payload_size_bytes_total counter" in text
    assert "# TYPE queue_depth gauge" in text  # a sum that goes down is a gauge
    assert "# TYPE cache_hit_rate_ratio gauge" in text
    assert "# TYPE job_duration_seconds histogram" in text
    assert 'service_name="names"' in next(
        line for line in text.splitlines() if line.startswith("target_info{")
    )
