"""OpenTelemetry traces and metrics, with Prometheus ``/metrics`` and OTLP export.

One server span per request (no per-message spans), its trace id the request
context's, so the id in every log and access line is the span's. HTTP metrics follow
the OTel semantic conventions. With no exporter configured spans are still created and
trace ids logged; setting ``OTLP_ENDPOINT`` exports traces and metrics, no code changed.

The server span and the request-duration histogram are on every request's path, so
kiban records them with less work than the SDK's general-purpose ones (see
``kiban.spans.ServerSpan`` and ``HTTPDurations``) and hands the result to the SDK's own span
processors and metric readers, so exporters and ``/metrics`` see ordinary OTel data.
"""

from __future__ import annotations

import random
import time
from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from contextvars import ContextVar
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.context.context import Context
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import Observation
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    HistogramDataPoint,
    Metric,
    MetricReader,
    MetricsData,
    PeriodicExportingMetricReader,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.metrics.export import Histogram as HistogramData
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext
from opentelemetry.trace.propagation import _SPAN_KEY
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.requests import Request
from starlette.responses import Response

from kiban import propagation
from kiban.config import Settings
from kiban.export import SpanBatcher
from kiban.spans import NOT_SAMPLED, SCOPE, ServerSpan, Spans, span_context

__all__ = ["HTTPDurations", "ServerSpan", "Telemetry", "meter", "tracer"]

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


def _runtime_context_var() -> ContextVar[Context] | None:
    """The contextvar behind the OTel API's current context, when it is the SDK default's."""
    runtime = getattr(otel_context, "_RUNTIME_CONTEXT", None)
    found = getattr(runtime, "_current_context", None)
    if isinstance(runtime, ContextVarsRuntimeContext) and isinstance(found, ContextVar):
        return found
    return None


_CURRENT = _runtime_context_var()


def activate(span: trace.Span) -> object:
    """Make ``span`` current in the OTel context; ``deactivate`` with what it returns.

    ``context.attach(trace.set_span_in_context(span))`` through six API calls, or as one
    contextvar set when the runtime context is the default contextvars one.
    """
    if _CURRENT is None:
        return otel_context.attach(trace.set_span_in_context(span))
    return _CURRENT.set(Context({**_CURRENT.get(), _SPAN_KEY: span}))


def deactivate(token: object) -> None:
    if _CURRENT is None:
        otel_context.detach(token)  # type: ignore[arg-type]
    else:
        _CURRENT.reset(token)  # type: ignore[arg-type]


class _Series:
    __slots__ = ("counts", "max", "min", "sum")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * buckets
        self.sum = 0.0
        self.min = float("inf")
        self.max = float("-inf")


class HTTPDurations:
    """``http.server.request.duration``: an explicit-bucket histogram kept by kiban.

    The SDK's ``Histogram.record`` cleans and hashes the attributes of every
    measurement; a service has a handful of (method, status, route) series, so kiban
    keeps one bucket array each and gives the metric readers the same cumulative data
    points the SDK would. The event loop is the one writer; readers only copy.
    """

    name = "http.server.request.duration"

    def __init__(self, bounds: Sequence[float] = DURATION_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self.series: dict[tuple[str, int, str | None], _Series] = {}
        self.start = time.time_ns()

    def record(self, method: str, status: int, route: str | None, seconds: float) -> None:
        key = (method, status, route)
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = _Series(len(self.bounds) + 1)
        series.counts[bisect_left(self.bounds, seconds)] += 1
        series.sum += seconds
        if seconds < series.min:
            series.min = seconds
        if seconds > series.max:
            series.max = seconds

    def metric(self) -> Metric | None:
        now = time.time_ns()
        points = []
        for (method, status, route), series in list(self.series.items()):
            counts = list(series.counts)
            attributes: dict[str, str | int] = {
                "http.request.method": method,
                "http.response.status_code": status,
            }
            if route is not None:
                attributes["http.route"] = route
            points.append(
                HistogramDataPoint(
                    attributes=attributes,
                    start_time_unix_nano=self.start,
                    time_unix_nano=now,
                    count=sum(counts),
                    sum=series.sum,
                    bucket_counts=counts,
                    explicit_bounds=self.bounds,
                    min=series.min,
                    max=series.max,
                )
            )
        if not points:
            return None
        return Metric(
            name=self.name,
            description="Duration of HTTP requests.",
            unit="s",
            data=HistogramData(points, AggregationTemporality.CUMULATIVE),
        )

    def added_to(
        self, data: MetricsData | None, resource: Resource, scope: InstrumentationScope
    ) -> MetricsData | None:
        """``data`` with this histogram in ``scope``'s metrics."""
        metric = self.metric()
        if metric is None:
            return data
        if data is None or not data.resource_metrics:
            return MetricsData([ResourceMetrics(resource, [ScopeMetrics(scope, [metric], "")], "")])
        first, *rest = data.resource_metrics
        scopes = list(first.scope_metrics)
        for index, found in enumerate(scopes):
            if found.scope.name == scope.name:
                scopes[index] = ScopeMetrics(
                    found.scope, [*found.metrics, metric], found.schema_url
                )
                break
        else:
            scopes.append(ScopeMetrics(scope, [metric], ""))
        return MetricsData([ResourceMetrics(first.resource, scopes, first.schema_url), *rest])


class _WithDurations:
    """A metric reader mixin: what the reader collects, plus kiban's HTTP durations."""

    durations: HTTPDurations
    resource: Resource

    def _receive_metrics(self, metrics_data: MetricsData, *args: Any, **kwargs: Any) -> None:
        data = self.durations.added_to(metrics_data, self.resource, SCOPE)
        super()._receive_metrics(data, *args, **kwargs)  # type: ignore[misc]


class _PrometheusReader(_WithDurations, PrometheusMetricReader):
    pass


class _PeriodicReader(_WithDurations, PeriodicExportingMetricReader):
    pass


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
    return _PeriodicReader(exporter, export_interval_millis=interval)


class Telemetry:
    """The tracer and meter of one service, and where their data goes."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        resource = Resource.create(
            {"service.name": settings.service_name, "service.version": settings.service_version}
        )
        self.tracer_provider = TracerProvider(
            resource=resource,
            sampler=ParentBased(TraceIdRatioBased(settings.trace_sample_ratio)),
            id_generator=_ContextIds(),
        )
        self.registry = CollectorRegistry()
        self.durations = HTTPDurations()
        readers: list[MetricReader] = [_PrometheusReader(registry=self.registry)]
        if settings.otlp_endpoint:
            self.export_spans(_span_exporter(settings))
            readers.append(_metric_reader(settings))
        for reader in readers:
            reader.durations = self.durations  # type: ignore[attr-defined]
            reader.resource = resource  # type: ignore[attr-defined]
        self.meter_provider = MeterProvider(
            resource=resource,
            metric_readers=readers,
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
        self._spans = Spans(self.tracer_provider, settings.trace_sample_ratio)
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
        self.auth_failures = self.meter.create_counter(
            "kiban.auth.failures", unit="{failure}", description="Requests refused by security."
        )
        self.rate_limited = self.meter.create_counter(
            "kiban.ratelimit.rejected", unit="{request}", description="Requests over a limit."
        )
        self.ratelimit_errors = self.meter.create_counter(
            "kiban.ratelimit.storage_errors",
            unit="{error}",
            description="Rate-limit checks that could not reach their storage.",
        )

    def export_spans(self, exporter: SpanExporter) -> SpanBatcher:
        """Send every sampled span to ``exporter`` too, in batches, as OTLP's are sent."""
        settings = self.settings
        batcher = SpanBatcher(
            exporter,
            max_batch=settings.trace_export_batch,
            max_queue=settings.trace_export_queue,
            delay=settings.trace_export_delay,
        )
        self.tracer_provider.add_span_processor(batcher)
        return batcher

    def _observe_active(self, _: Any) -> Iterable[Observation]:
        yield Observation(self.active)

    def describe(self) -> str:
        """Where telemetry goes, for the start-up log line."""
        if self.settings.otlp_endpoint:
            return f"OTLP {self.settings.otlp_protocol} {self.settings.otlp_endpoint} and /metrics"
        return "in process (spans not exported) and /metrics"

    async def metrics_endpoint(self, _: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    def shutdown(self) -> None:
        """Flush what is buffered to the exporters.

        The process-wide providers are flushed, not shut down: the OTel API keeps
        handing them out until the process ends.
        """
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
        trace_id: str,
        traceparent: str | None,
        tracestate: str | None,
        link: bool = False,
    ) -> trace.Span:
        """The request's server span, already current; its trace id is the context's.

        Sampling is the SDK's ``ParentBased(TraceIdRatioBased)``: a remote parent's
        decision is kept, a root is sampled by its trace id. With ``link`` (a caller
        kiban does not trust, OTel's guidance for public endpoints) the caller's span is
        not the parent: the span starts a new trace, sampled by its own id, and keeps
        the caller's as a link.
        """
        parent: SpanContext | None = None
        if traceparent is not None:
            carrier = {"traceparent": traceparent}
            if tracestate is not None:
                carrier["tracestate"] = tracestate
            found = trace.get_current_span(_tracecontext.extract(carrier, getter=_getter))
            if found.get_span_context().is_valid:
                parent = found.get_span_context()
        linked = None
        if link:
            linked, parent = parent, None
        number = int(trace_id, 16)
        if parent is not None:
            sampled = parent.trace_flags.sampled
        else:
            sampled = number & TraceIdRatioBased.TRACE_ID_LIMIT < self._spans.bound
        span_id = random.getrandbits(64) or 1
        if not sampled:
            return trace.NonRecordingSpan(span_context(number, span_id, NOT_SAMPLED, parent))
        span = ServerSpan(method, path, scheme, client, number, span_id, parent, self._spans)
        if linked is not None:
            span.add_link(linked, {"kiban.link": "untrusted caller"})
        return span

    def end_span(
        self, span: trace.Span, method: str, status: int, route: str | None, seconds: float
    ) -> str:
        """Finish the server span, count the request in the duration histogram.

        Returns the span's id in W3C form, for the access line.
        """
        self.durations.record(method, status, route, seconds)
        if isinstance(span, ServerSpan):
            name = None
            if route:
                name = self._names.get((method, route))
                if name is None:
                    name = self._names[(method, route)] = f"{method} {route}"
            span.finish(status, route, name)
            return "%016x" % span._span_id  # noqa: UP031 (faster)
        return "%016x" % span.get_span_context().span_id  # noqa: UP031 (faster)
