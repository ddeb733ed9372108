"""OpenTelemetry traces and metrics, with Prometheus ``/metrics`` and OTLP export.

One server span per request (no per-message spans), its trace id the request
context's, so the id in every log and access line is the span's. HTTP metrics follow
the OTel semantic conventions. With no exporter configured spans are still created and
trace ids logged; setting ``OTLP_ENDPOINT`` exports traces and metrics, no code changed.

Everything goes through the OTel SDK's public interfaces: the server span is started
by the provider's tracer, so the provider's sampler decides it and every span
processor sees its ``on_start`` and ``on_end``; spans are exported by the SDK's
``BatchSpanProcessor``; the request-duration histogram is an SDK instrument.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.metrics import Observation
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    InMemoryMetricReader,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.openmetrics import exposition as openmetrics
from starlette.requests import Request
from starlette.responses import Response

from kiban import _propagation as propagation
from kiban._config import Settings
from kiban._cpu import CpuUsage
from kiban._log import sink
from kiban._otlplogs import LogExporter
from kiban._prometheus import MetricsCollector

__all__ = ["Telemetry", "meter", "tracer"]

#: The OTel semantic-convention buckets for request durations, in seconds.
DURATION_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)
_tracecontext = TraceContextTextMapPropagator()
_globals_set = False


def meter(name: str = "app") -> metrics.Meter:
    """A meter for the service's own metrics: ``meter().create_counter("orders_total")``.

    Its instruments appear on ``/metrics`` and go to OTLP with kiban's own.
    """
    return metrics.get_meter(name)


def tracer(name: str = "app") -> trace.Tracer:
    """A tracer for child spans; the plain OTel API (``trace.get_tracer``) is the same."""
    return trace.get_tracer(name)


class _ContextIds(IdGenerator):
    """Root spans take the request context's trace id, so logs and spans agree."""

    def __init__(self) -> None:
        self._random = RandomIdGenerator()

    def generate_span_id(self) -> int:
        return self._random.generate_span_id()

    def generate_trace_id(self) -> int:
        context = propagation.current()
        if context is not None:
            return int(context.trace_id, 16)
        return self._random.generate_trace_id()


class _ScopeHeaders(Getter[Mapping[str, str]]):
    def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
        value = carrier.get(key)
        return [value] if value is not None else None

    def keys(self, carrier: Mapping[str, str]) -> list[str]:
        return list(carrier)


_getter = _ScopeHeaders()


def in_trace() -> bool:
    """Whether a span is current: a dependency call is a child span only then (a readiness
    ping or a migration, outside any request, is measured but not traced)."""
    return trace.get_current_span().get_span_context().is_valid


def activate(span: trace.Span) -> object:
    """Make ``span`` current in the OTel context; ``deactivate`` with what it returns."""
    return otel_context.attach(trace.set_span_in_context(span))


def deactivate(token: object) -> None:
    otel_context.detach(token)  # type: ignore[arg-type]


def _span_exporter(settings: Settings) -> SpanExporter:
    endpoint = settings.otlp_endpoint
    assert endpoint is not None
    if settings.otlp_protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HTTPSpanExporter,
    )

    return HTTPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces")


def _metric_reader(settings: Settings) -> PeriodicExportingMetricReader:
    endpoint = settings.otlp_endpoint
    assert endpoint is not None
    interval = int(settings.metrics_export_interval * 1000)
    if settings.otlp_protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        exporter: Any = OTLPMetricExporter(
            endpoint=endpoint, insecure=endpoint.startswith("http://")
        )
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
            OTLPMetricExporter as HTTPMetricExporter,
        )

        exporter = HTTPMetricExporter(endpoint=endpoint.rstrip("/") + "/v1/metrics")
    return PeriodicExportingMetricReader(exporter, export_interval_millis=interval)


#: The methods OTel's HTTP conventions name; any other is recorded as ``_OTHER`` (the
#: span keeps it in ``http.request.method_original``): a server that passes any token
#: as a method (granian does) must not let a client mint a series, or a dict entry,
#: per request.
KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)

#: gRPC codes that mark a server span as failed (OTel's RPC conventions): UNKNOWN,
#: DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS.
_RPC_SERVER_ERRORS = frozenset({2, 4, 12, 13, 14, 15})


def _parent(
    traceparent: str | None, tracestate: str | None, link: bool
) -> tuple[Context | None, list[Link] | None]:
    """The remote parent in a ``traceparent``, or (``link``) a link to it and no parent."""
    if traceparent is None:
        return None, None
    carrier = {"traceparent": traceparent}
    if tracestate is not None:
        carrier["tracestate"] = tracestate
    parent = _tracecontext.extract(carrier, getter=_getter)
    if not link:
        return parent, None
    caller = trace.get_current_span(parent).get_span_context()
    if caller.is_valid:
        return None, [Link(caller, {"kiban.link": "untrusted caller"})]
    return None, None


class _Registries:
    """kiban's registry and the app's, read as one (an OpenMetrics document is one)."""

    def __init__(self, *registries: CollectorRegistry) -> None:
        self.registries = registries

    def collect(self) -> Iterator[Any]:
        for registry in self.registries:
            yield from registry.collect()


class Telemetry:
    """The tracer and meter of one service, and where their data goes.

    ``sampler`` replaces kiban's default, ``ParentBased(TraceIdRatioBased(
    TRACE_SAMPLE_RATIO))``; it decides the server spans as any other span.
    """

    def __init__(self, settings: Settings, sampler: Sampler | None = None) -> None:
        self.settings = settings
        resource = Resource.create(
            {"service.name": settings.service_name, "service.version": settings.service_version}
        )
        # Flushed by kiban's shutdown within its cleanup budget, and not again at exit:
        # the SDK's own exit handler waits up to 30 s a processor, batch after batch,
        # on a collector that is down, past a pod's grace period.
        self.tracer_provider = TracerProvider(
            resource=resource,
            sampler=sampler or ParentBased(TraceIdRatioBased(settings.trace_sample_ratio)),
            id_generator=_ContextIds(),
            shutdown_on_exit=False,
        )
        self.registry = CollectorRegistry()
        if REGISTRY.get_sample_value("process_start_time_seconds") is None:
            # The app took prometheus_client's own process metrics off its default
            # registry (which /metrics serves too): kiban's registry has them then.
            ProcessCollector(registry=self.registry)
            GCCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
        # /metrics reads the provider when scraped, through the SDK's public in-memory
        # reader; kiban writes what it reads as Prometheus families, with exemplars.
        scraped = InMemoryMetricReader()
        self.registry.register(MetricsCollector(scraped, resource))
        readers: list[MetricReader] = [scraped]
        self.logs: LogExporter | None = None
        if settings.otlp_endpoint:
            self.export_spans(_span_exporter(settings))
            readers.append(_metric_reader(settings))
            if settings.otlp_logs:
                self.logs = LogExporter(
                    settings,
                    {
                        "service.name": settings.service_name,
                        "service.version": settings.service_version,
                    },
                )
                sink.tees.append(self.logs.offer)
        self.meter_provider = MeterProvider(
            resource=resource,
            metric_readers=readers,
            shutdown_on_exit=False,
            views=[
                View(
                    instrument_name="*duration*",
                    aggregation=ExplicitBucketHistogramAggregation(DURATION_BUCKETS),
                )
            ],
        )
        # Handlers use the plain OTel API; the first service in a process provides it.
        global _globals_set
        self.is_global = not _globals_set
        if self.is_global:
            _globals_set = True
            trace.set_tracer_provider(self.tracer_provider)
            metrics.set_meter_provider(self.meter_provider)
        self.tracer = self.tracer_provider.get_tracer("kiban")
        self.meter = self.meter_provider.get_meter("kiban")
        self.durations = self.meter.create_histogram(
            "http.server.request.duration", unit="s", description="Duration of HTTP requests."
        )
        self.db_durations = self.meter.create_histogram(
            "db.client.operation.duration", unit="s", description="Duration of SQL statements."
        )
        #: Each database's pool, observed at collection (``_dbtelemetry.observe``).
        self.pools: list[Callable[[], Iterable[Observation]]] = []
        self.meter.create_observable_up_down_counter(
            "db.client.connection.count",
            callbacks=[lambda _: [point for pool in self.pools for point in pool()]],
            unit="{connection}",
            description="Connections of each database pool, by state.",
        )
        self.rpc_durations = self.meter.create_histogram(
            "rpc.server.duration", unit="s", description="Duration of gRPC calls."
        )
        self._rpc_attributes: dict[tuple[str, str, int], dict[str, str | int]] = {}
        # A request's attributes, made once for each (method, status, route) seen.
        self._attributes: dict[tuple[Any, ...], dict[str, str | int]] = {}
        self._names: dict[tuple[str, str], str] = {}  # "GET /items/{id}", made once a route
        self.exclude = settings.telemetry_exclude_paths
        # Counted in a plain int and read at collection: no SDK call on the request path.
        self.active = 0
        self.meter.create_observable_up_down_counter(
            "http.server.active_requests",
            callbacks=[self._observe_active],
            unit="{request}",
            description="HTTP requests being served.",
        )
        self.meter.create_observable_gauge(
            "process.thread.count",
            callbacks=[lambda _: [Observation(threading.active_count())]],
            unit="{thread}",
            description="Threads of the process.",
        )
        #: The event loop's lag as last measured (``watch_loop``), in seconds.
        self.loop_lag = 0.0
        #: When the lag probe's timer is due (loop time), and its loop.
        self._lag_due: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: This process's CPU usage, 0 to 1, of the CPU it can use (``watch_loop``).
        self.cpu = CpuUsage()
        self.cpu_usage = 0.0
        self.meter.create_observable_gauge(
            "kiban.cpu.usage",
            callbacks=[lambda _: [Observation(self.cpu_usage)]],
            unit="1",
            description="The process's CPU use of what it can use (one core, or the "
            "cgroup's quota if less), averaged over a few seconds.",
        )
        self.meter.create_observable_gauge(
            "kiban.event_loop.lag",
            callbacks=[lambda _: [Observation(self.loop_lag)]],
            unit="s",
            description="How late the event loop ran a timer, last measured.",
        )
        self.auth_failures = self.meter.create_counter(
            "kiban.auth.failures", unit="{failure}", description="Requests refused by security."
        )
        self.rate_limited = self.meter.create_counter(
            "kiban.ratelimit.rejected", unit="{request}", description="Requests over a limit."
        )
        self.log_dropped = self.meter.create_counter(
            "kiban.log.dropped",
            unit="{line}",
            description="Log lines of successful requests not written (LOG_BUFFERING).",
        )
        self.meter.create_observable_counter(
            "kiban.log.output_dropped",
            callbacks=[lambda _: [Observation(sink.dropped)]],
            unit="{line}",
            description="Log lines dropped because the output did not take them "
            "(stdout stalled past LOG_MAX_HELD_BYTES).",
        )
        #: Requests refused at capacity, by reason: counted in plain ints and read at
        #: collection, as ``active`` is. A refusal must cost as little as it can (what an
        #: overloaded server spends refusing it takes from the requests it serves), and
        #: an SDK counter's ``add`` was a quarter of a refusal's cost.
        self.shed: dict[str, int] = {}
        self.meter.create_observable_counter(
            "kiban.shed",
            callbacks=[
                # list() copies in one step: a new reason may be added on the loop's
                # thread while an exporter's thread collects.
                lambda _: [
                    Observation(count, {"reason": reason})
                    for reason, count in list(self.shed.items())
                ]
            ],
            unit="{request}",
            description="Requests refused at capacity (503).",
        )
        self.ratelimit_errors = self.meter.create_counter(
            "kiban.ratelimit.storage_errors",
            unit="{error}",
            description="Rate-limit checks that could not reach their storage.",
        )

    async def watch_loop(self, interval: float = 0.02, cpu_every: int = 25) -> None:
        """Measure the event loop's lag (every ``interval``) and the CPU usage (every
        ``cpu_every`` of them), forever: how late a timer fires is how long every
        request waits behind whatever holds the loop. Often, because the shedder is blind
        to a surge until the probe is due: what it admits meanwhile sets the tail."""
        loop = self._loop = asyncio.get_running_loop()
        ticks = 0
        while True:
            self._lag_due = expected = loop.time() + interval
            await asyncio.sleep(interval)
            self.loop_lag = max(0.0, loop.time() - expected)
            ticks += 1
            if ticks % cpu_every == 0:
                self.cpu_usage = self.cpu.sample()

    def current_lag(self) -> float:
        """The loop's lag as of now: the last measurement, or more if the probe is overdue.

        A timer only reports its lateness once it runs, after the backlog that delays
        it; a loop already past the probe's due time is late by at least that much, and
        the shedder reads it from the first request that arrives meanwhile.
        """
        due, loop = self._lag_due, self._loop
        if due is None or loop is None:
            return self.loop_lag
        return max(self.loop_lag, loop.time() - due)

    def export_spans(self, exporter: SpanExporter) -> BatchSpanProcessor:
        """Send every sampled span to ``exporter`` too, in batches, as OTLP's are sent."""
        settings = self.settings
        processor = BatchSpanProcessor(
            exporter,
            max_queue_size=settings.trace_export_queue,
            schedule_delay_millis=settings.trace_export_delay * 1000,
            max_export_batch_size=min(settings.trace_export_batch, settings.trace_export_queue),
        )
        self.tracer_provider.add_span_processor(processor)
        return processor

    def _observe_active(self, _: Any) -> Iterable[Observation]:
        yield Observation(self.active)

    def describe(self) -> str:
        """Where telemetry goes, for the start-up log line."""
        if self.settings.otlp_endpoint:
            return f"OTLP {self.settings.otlp_protocol} {self.settings.otlp_endpoint} and /metrics"
        return "in process (spans not exported) and /metrics"

    async def metrics_endpoint(self, request: Request) -> Response:
        """kiban's metrics, then what the app registered with ``prometheus_client``'s
        default registry (and its process, GC and platform metrics)."""
        if "application/openmetrics-text" in request.headers.get("accept", ""):
            # One document (OpenMetrics ends with "# EOF"), with the exemplars.
            both = _Registries(self.registry, REGISTRY)
            return Response(
                openmetrics.generate_latest(both),  # type: ignore[no-untyped-call]
                media_type=openmetrics.CONTENT_TYPE_LATEST,
            )
        body = generate_latest(self.registry) + generate_latest(REGISTRY)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    def shutdown(self) -> None:
        """Flush what is buffered to the exporters.

        The process-wide providers are flushed, not shut down: the OTel API keeps
        handing them out until the process ends.
        """
        if self.logs is not None:
            sink.tees.remove(self.logs.offer)
            self.logs.shutdown()
            self.logs = None
        if self.is_global:
            self.tracer_provider.force_flush(timeout_millis=5000)
            self.meter_provider.force_flush(timeout_millis=5000)
        else:
            self.tracer_provider.shutdown()
            self.meter_provider.shutdown()

    def start_span(
        self,
        method: str,
        path: str,
        scheme: str,
        client: str,
        traceparent: str | None,
        tracestate: str | None,
        link: bool = False,
    ) -> trace.Span:
        """The request's server span; its trace id is the request context's.

        The provider's sampler decides it (kiban's default keeps a remote parent's
        decision and samples a root by its trace id). With ``link`` (a caller kiban
        does not trust, OTel's guidance for public endpoints) the caller's span is not
        the parent: the span starts a new trace, sampled on its own, and keeps the
        caller's as a link.
        """
        parent, links = _parent(traceparent, tracestate, link)
        attributes: dict[str, str] = {
            "http.request.method": method,
            "url.path": path,
            "url.scheme": scheme,
            "client.address": client,
        }
        if method not in KNOWN_METHODS:  # a client's own word: kept, not a name or label
            attributes["http.request.method"] = "_OTHER"
            attributes["http.request.method_original"] = method
            method = "HTTP"
        return self.tracer.start_span(method, parent, SpanKind.SERVER, attributes, links)

    def start_rpc_span(
        self,
        service: str,
        method: str,
        client: str,
        traceparent: str | None,
        tracestate: str | None,
        link: bool = False,
    ) -> trace.Span:
        """An RPC's server span, decided and parented as ``start_span`` does a request's."""
        parent, links = _parent(traceparent, tracestate, link)
        return self.tracer.start_span(
            f"{service}/{method}",
            parent,
            SpanKind.SERVER,
            {
                "rpc.system": "grpc",
                "rpc.service": service,
                "rpc.method": method,
                "client.address": client,
            },
            links,
        )

    def end_rpc_span(
        self, span: trace.Span, service: str, method: str, code: int, seconds: float
    ) -> str:
        """Finish an RPC's span, count it in ``rpc.server.duration``; the span id, W3C form."""
        key = (service, method, code)
        attributes = self._rpc_attributes.get(key)
        if attributes is None:
            attributes = self._rpc_attributes[key] = {
                "rpc.system": "grpc",
                "rpc.service": service,
                "rpc.method": method,
                "rpc.grpc.status_code": code,
            }
        self.rpc_durations.record(seconds, attributes)
        if span.is_recording():
            span.set_attribute("rpc.grpc.status_code", code)
            if code in _RPC_SERVER_ERRORS:
                span.set_status(Status(StatusCode.ERROR))
            span.end()
        return "%016x" % span.get_span_context().span_id  # noqa: UP031 (faster)

    def end_span(
        self,
        span: trace.Span,
        method: str,
        status: int,
        route: str | None,
        seconds: float,
        scheme: str = "http",
        version: str = "1.1",
        error: str | None = None,
    ) -> str:
        """Finish the server span, count the request in the duration histogram.

        Attributes as OTel's HTTP semantic conventions name them; ``error.type`` is the
        exception's class when the request failed on one, else a 5xx status as text.
        Returns the span's id in W3C form, for the access line.
        """
        if error is None and status >= 500:
            error = str(status)
        if method not in KNOWN_METHODS:
            method = "_OTHER"
        key = (method, status, route, scheme, version, error)
        attributes = self._attributes.get(key)
        if attributes is None:
            attributes = {
                "http.request.method": method,
                "http.response.status_code": status,
                "url.scheme": scheme,
                "network.protocol.version": version,
            }
            if route is not None:
                attributes["http.route"] = route
            if error is not None:
                attributes["error.type"] = error
            self._attributes[key] = attributes
        self.durations.record(seconds, attributes)
        if span.is_recording():
            span.set_attribute("http.response.status_code", status)
            span.set_attribute("network.protocol.version", version)
            if error is not None:
                span.set_attribute("error.type", error)
            if route:
                span.set_attribute("http.route", route)
                name = self._names.get((method, route))
                if name is None:
                    shown = "HTTP" if method == "_OTHER" else method
                    name = self._names[(method, route)] = f"{shown} {route}"
                span.update_name(name)
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            span.end()
        return "%016x" % span.get_span_context().span_id  # noqa: UP031 (faster)
