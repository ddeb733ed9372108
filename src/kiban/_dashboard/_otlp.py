"""OTLP/HTTP export requests, decoded into the dashboard's plain records.

The services export with the OTel SDK's OTLP/HTTP exporters (and kiban's log exporter),
exactly as they would to a production collector: protobuf bodies, optionally gzip.
The messages come from ``opentelemetry-proto`` (the ``otlp`` extra), imported when a
request is decoded, so ``kiban.dev`` imports without it.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DecodeError", "Histogram", "Log", "Span", "decode_body", "logs", "metrics", "spans"]

_KINDS = {0: "unspecified", 1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}
_STATUSES = {0: "unset", 1: "ok", 2: "error"}
#: Only this histogram is kept: the services page's rate, errors and percentiles.
REQUEST_DURATION = "http.server.request.duration"


class DecodeError(ValueError):
    """The body is not an OTLP export request."""


@dataclass(slots=True)
class Span:
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: str
    service: str
    start: int  # unix ns
    end: int
    status: str
    status_message: str
    attributes: dict[str, Any]
    events: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "parent_id": self.parent_id,
            "name": self.name,
            "kind": self.kind,
            "service": self.service,
            "start": self.start,
            "end": self.end,
            "duration_ms": round((self.end - self.start) / 1e6, 3),
            "status": self.status,
            "status_message": self.status_message,
            "attributes": self.attributes,
            "events": self.events,
        }


@dataclass(slots=True)
class Log:
    time: int  # unix ns
    service: str
    level: str
    message: str
    trace_id: str
    span_id: str
    attributes: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "service": self.service,
            "level": self.level,
            "msg": self.message,
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "attributes": self.attributes,
        }


@dataclass(slots=True)
class Histogram:
    """One export's ``http.server.request.duration`` of one service, all series summed."""

    service: str
    version: str
    time: int
    count: int
    errors: int
    bounds: tuple[float, ...]
    buckets: list[int]
    cumulative: bool


def decode_body(body: bytes, encoding: str | None) -> bytes:
    try:
        if encoding == "gzip":
            return gzip.decompress(body)
        if encoding == "deflate":
            return zlib.decompress(body)
    except (OSError, zlib.error, EOFError) as error:
        raise DecodeError(f"body is not valid {encoding}") from error
    if encoding not in (None, "", "identity"):
        raise DecodeError(f"unsupported content-encoding {encoding}")
    return body


def _parse(message: Any, body: bytes) -> Any:
    try:
        message.ParseFromString(body)
    except Exception as error:  # protobuf's DecodeError, of whichever implementation
        raise DecodeError("body is not an OTLP protobuf export request") from error
    return message


def value(item: Any) -> Any:
    kind = item.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [value(element) for element in item.array_value.values]
    if kind == "kvlist_value":
        return {pair.key: value(pair.value) for pair in item.kvlist_value.values}
    if kind == "bytes_value":
        return item.bytes_value.hex()
    return getattr(item, kind)


def _attributes(items: Any) -> dict[str, Any]:
    return {item.key: value(item.value) for item in items}


def _service(resource: Any) -> tuple[str, str]:
    attributes = _attributes(resource.attributes)
    return str(attributes.get("service.name", "unknown")), str(
        attributes.get("service.version", "")
    )


def _items(resources: Any, scopes: str, items: str) -> Iterator[tuple[str, str, Any]]:
    """Each span, log record or metric of an export request, with its service's name
    and version: ``resources`` hold ``scopes``, which hold ``items``."""
    for resource in resources:
        service, version = _service(resource.resource)
        for scope in getattr(resource, scopes):
            for item in getattr(scope, items):
                yield service, version, item


def spans(body: bytes) -> list[Span]:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    request = _parse(ExportTraceServiceRequest(), body)
    return [
        Span(
            trace_id=span.trace_id.hex(),
            span_id=span.span_id.hex(),
            parent_id=span.parent_span_id.hex(),
            name=span.name,
            kind=_KINDS.get(span.kind, "internal"),
            service=service,
            start=span.start_time_unix_nano,
            end=max(span.end_time_unix_nano, span.start_time_unix_nano),
            status=_STATUSES.get(span.status.code, "unset"),
            status_message=span.status.message,
            attributes=_attributes(span.attributes),
            events=[
                {
                    "name": event.name,
                    "time": event.time_unix_nano,
                    "attributes": _attributes(event.attributes),
                }
                for event in span.events
            ],
        )
        for service, _, span in _items(request.resource_spans, "scope_spans", "spans")
    ]


_LEVELS = {1: "trace", 5: "debug", 9: "info", 13: "warning", 17: "error", 21: "critical"}


def _level(record: Any) -> str:
    if record.severity_text:
        return str(record.severity_text).lower()
    number = record.severity_number
    return next(
        (name for floor, name in sorted(_LEVELS.items(), reverse=True) if number >= floor), "info"
    )


def logs(body: bytes) -> list[Log]:
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

    request = _parse(ExportLogsServiceRequest(), body)
    out = []
    for service, _, record in _items(request.resource_logs, "scope_logs", "log_records"):
        message = value(record.body)
        out.append(
            Log(
                time=record.time_unix_nano or record.observed_time_unix_nano,
                service=service,
                level=_level(record),
                message="" if message is None else str(message),
                trace_id=record.trace_id.hex(),
                span_id=record.span_id.hex(),
                attributes=_attributes(record.attributes),
            )
        )
    return out


def metrics(body: bytes) -> list[Histogram]:
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
        ExportMetricsServiceRequest,
    )

    request = _parse(ExportMetricsServiceRequest(), body)
    out = []
    for service, version, metric in _items(request.resource_metrics, "scope_metrics", "metrics"):
        if metric.name != REQUEST_DURATION or not metric.HasField("histogram"):
            continue
        histogram = metric.histogram
        total: Histogram | None = None
        for point in histogram.data_points:
            status = _attributes(point.attributes).get("http.response.status_code")
            failed = isinstance(status, int) and status >= 500
            if total is None or tuple(point.explicit_bounds) != total.bounds:
                total = Histogram(
                    service=service,
                    version=version,
                    time=point.time_unix_nano,
                    count=0,
                    errors=0,
                    bounds=tuple(point.explicit_bounds),
                    buckets=[0] * len(point.bucket_counts),
                    cumulative=histogram.aggregation_temporality != 1,
                )
                out.append(total)
            total.count += point.count
            total.errors += point.count if failed else 0
            total.time = max(total.time, point.time_unix_nano)
            for index, count in enumerate(point.bucket_counts):
                total.buckets[index] += count
    return out
