"""OpenTelemetry metrics as Prometheus metric families, with exemplars.

The service's meter provider is read by the SDK's public ``InMemoryMetricReader``
when ``/metrics`` is scraped, and its data is written as ``prometheus_client``
families, named by OTel's Prometheus compatibility rules: dots become underscores, the
unit becomes a suffix (``s`` → ``_seconds``, ``By`` → ``_bytes``, a gauge's ``1`` →
``_ratio``; annotations such as ``{request}`` are dropped), monotonic sums are
counters (``_total``), other sums and gauges are gauges, the instrumentation scope is in
``otel_scope_*`` labels and the resource in ``target_info``.

Histogram buckets carry the exemplars the SDK kept (its default filter keeps them for
sampled requests only, one per bucket): a trace id beside a slow bucket leads from a
dashboard's spike to the trace. They are written when the scraper asks for OpenMetrics,
the only format that has them. The SDK hands a bucket's exemplar to one collection
only; the collector keeps the latest of each bucket, so every scrape (a second
Prometheus, a classic-format scrape in between) still sees it.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from typing import Any

from opentelemetry.sdk.metrics.export import (
    Gauge,
    Histogram,
    InMemoryMetricReader,
    Metric,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.metrics_core import Metric as Family
from prometheus_client.samples import Exemplar

__all__ = ["MetricsCollector"]

_INVALID = re.compile(r"[^a-zA-Z0-9_]")
_UNITS = {
    "s": "seconds",
    "ms": "milliseconds",
    "us": "microseconds",
    "ns": "nanoseconds",
    "By": "bytes",
    "KiBy": "kibibytes",
    "MiBy": "mebibytes",
    "min": "minutes",
    "h": "hours",
    "d": "days",
    "%": "percent",
}
_SCOPE = ("otel_scope_name", "otel_scope_version", "otel_scope_schema_url")


def _name(text: str) -> str:
    name = _INVALID.sub("_", text)
    return f"_{name}" if name[:1].isdigit() else name


def _unit(unit: str | None, gauge: bool) -> str:
    """The Prometheus suffix of an OTel unit ('' for none or an annotation)."""
    if not unit or unit.startswith("{"):
        return ""
    if unit == "1":
        return "ratio" if gauge else ""
    return _UNITS.get(unit, _name(unit).strip("_"))


def _value(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


class MetricsCollector:
    """A ``prometheus_client`` collector of a meter provider's metrics (see above)."""

    def __init__(self, reader: InMemoryMetricReader, resource: Resource) -> None:
        self.reader = reader
        self.resource = resource
        #: The latest exemplar of each (histogram, labels, bucket).
        self.exemplars: dict[tuple[str, tuple[str, ...], int], Exemplar] = {}

    def collect(self) -> Iterator[Family]:
        info = GaugeMetricFamily(
            "target_info",
            "Target metadata",
            labels=[_name(key) for key in self.resource.attributes],
        )
        info.add_metric([_value(value) for value in self.resource.attributes.values()], 1)
        yield info
        data = self.reader.get_metrics_data()
        if data is None:
            return
        families: dict[str, Family] = {}
        for resource_metrics in data.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                scope = scope_metrics.scope
                scope_labels = [scope.name, scope.version or "", scope.schema_url or ""]
                for metric in scope_metrics.metrics:
                    self._add(families, metric, scope_labels)
        yield from families.values()

    def _add(self, families: dict[str, Family], metric: Metric, scope: list[str]) -> None:
        data = metric.data
        points: Iterable[Any] = data.data_points
        keys = sorted({key for point in points for key in (point.attributes or {})})
        names = [_name(key) for key in keys] + list(_SCOPE)

        def labels(point: Any) -> list[str]:
            attributes = point.attributes or {}
            return [_value(attributes.get(key, "")) for key in keys] + scope

        base = _name(metric.name)
        description = metric.description or ""
        if isinstance(data, Histogram):
            histogram = HistogramMetricFamily(
                base, description, labels=names, unit=_unit(metric.unit, False)
            )
            for bucketed in data.data_points:
                values = labels(bucketed)
                kept = self._exemplars(base, tuple(values), bucketed)
                histogram.add_metric(values, _buckets(bucketed, kept), bucketed.sum)
            family: Family = histogram
        elif isinstance(data, Sum) and data.is_monotonic:
            counter = CounterMetricFamily(
                base.removesuffix("_total"),
                description,
                labels=names,
                unit=_unit(metric.unit, False),
            )
            for point in data.data_points:
                counter.add_metric(labels(point), point.value)
            family = counter
        elif isinstance(data, Sum | Gauge):
            gauge = GaugeMetricFamily(
                base, description, labels=names, unit=_unit(metric.unit, True)
            )
            for point in data.data_points:
                gauge.add_metric(labels(point), point.value)
            family = gauge
        else:  # an exponential histogram: no classic Prometheus form
            return
        seen = families.get(family.name)
        if seen is None:
            families[family.name] = family
        else:  # the same instrument from another scope
            seen.samples.extend(family.samples)

    def _exemplars(self, name: str, labels: tuple[str, ...], point: Any) -> dict[int, Exemplar]:
        """The latest exemplar of each of the point's buckets, this collection's or kept."""
        bounds = point.explicit_bounds
        for exemplar in getattr(point, "exemplars", ()) or ():
            if exemplar.trace_id:
                self.exemplars[(name, labels, bisect_left(bounds, exemplar.value))] = Exemplar(
                    {
                        "trace_id": format(exemplar.trace_id, "032x"),
                        "span_id": format(exemplar.span_id, "016x"),
                    },
                    exemplar.value,
                    exemplar.time_unix_nano / 1e9,
                )
        return {
            index: kept
            for index in range(len(bounds) + 1)
            if (kept := self.exemplars.get((name, labels, index))) is not None
        }


def _buckets(point: Any, exemplars: dict[int, Exemplar]) -> list[Any]:
    """Cumulative buckets, each with its exemplar, if any."""
    bounds = point.explicit_bounds
    buckets: list[Any] = []
    total = 0
    for index, count in enumerate(point.bucket_counts):
        total += count
        bound = str(float(bounds[index])) if index < len(bounds) else "+Inf"
        exemplar = exemplars.get(index)
        buckets.append((bound, total, exemplar) if exemplar is not None else (bound, total))
    return buckets
