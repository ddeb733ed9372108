"""The dashboard's window: the latest spans, logs and request metrics, bounded in memory.

Everything is kept in arrival order in fixed-size windows (the oldest falls out), with
per-trace indexes so a trace's page is a lookup, not a scan. Every query answers from
what the window holds now; nothing is written to disk.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kiban._dashboard._otlp import Histogram, Log, Span

__all__ = ["ServiceState", "Store"]


@dataclass(slots=True)
class ServiceState:
    """One service: what ``kiban dev`` knows of it and what its telemetry said."""

    name: str
    url: str | None = None
    version: str = ""
    started_at: float | None = None  # when kiban dev (re)started it, wall clock
    first_seen: float | None = None
    managed: bool = False
    running: bool | None = None
    restarts: int = 0
    liveness: str = "unknown"
    readiness: dict[str, Any] = field(default_factory=dict)
    previous: Histogram | None = None
    latest: Histogram | None = None
    totals: Histogram | None = None  # delta exports, summed

    def as_dict(self, now: float) -> dict[str, Any]:
        since = self.started_at or self.first_seen
        out: dict[str, Any] = {
            "name": self.name,
            "url": self.url,
            "version": self.version,
            "managed": self.managed,
            "running": self.running,
            "restarts": self.restarts,
            "uptime_s": round(now - since, 1) if since else None,
            "liveness": self.liveness,
            "readiness": self.readiness,
        }
        out.update(self._rates())
        return out

    def _rates(self) -> dict[str, Any]:
        latest, previous = self.latest, self.previous
        if latest is None:
            return {"requests": 0, "rate": None, "error_rate": None, "p50_ms": None, "p99_ms": None}
        buckets, count, errors = latest.buckets, latest.count, latest.errors
        rate = None
        if (
            previous is not None
            and latest.time > previous.time
            and previous.bounds == latest.bounds
        ):
            seconds = (latest.time - previous.time) / 1e9
            delta = latest.count - previous.count
            rate = round(max(delta, 0) / seconds, 3)
            if delta > 0:  # percentiles and errors of the last interval when it had requests
                buckets = [a - b for a, b in zip(latest.buckets, previous.buckets, strict=True)]
                count, errors = delta, latest.errors - previous.errors
        return {
            "requests": latest.count,
            "rate": rate,
            "error_rate": round(errors / count, 4) if count else None,
            "p50_ms": _percentile(latest.bounds, buckets, count, 0.5),
            "p99_ms": _percentile(latest.bounds, buckets, count, 0.99),
        }


def _percentile(
    bounds: tuple[float, ...], buckets: list[int], count: int, q: float
) -> float | None:
    """The q-quantile in ms, interpolated inside its bucket as Prometheus does."""
    if count <= 0:
        return None
    rank = q * count
    seen = 0
    for index, in_bucket in enumerate(buckets):
        if in_bucket and seen + in_bucket >= rank:
            low = bounds[index - 1] if index > 0 else 0.0
            if index >= len(bounds):  # the +Inf bucket: its lower bound is all we know
                return round(low * 1000, 3)
            high = bounds[index]
            return round((low + (high - low) * (rank - seen) / in_bucket) * 1000, 3)
        seen += in_bucket
    return None


class Store:
    """Bounded windows of spans and logs, and each service's state."""

    def __init__(self, max_spans: int = 20_000, max_logs: int = 20_000) -> None:
        self.max_spans = max_spans
        self.max_logs = max_logs
        self.spans: deque[Span] = deque()
        self.logs: deque[Log] = deque()
        self._trace_spans: dict[str, list[Span]] = {}
        self._trace_logs: dict[str, list[Log]] = {}
        self.services: dict[str, ServiceState] = {}
        #: Bumped on every change: live pages refetch when it moves.
        self.version = 0

    def service(self, name: str) -> ServiceState:
        state = self.services.get(name)
        if state is None:
            state = self.services[name] = ServiceState(name, first_seen=time.time())
        return state

    def changed(self) -> None:
        self.version += 1

    # -- intake ---------------------------------------------------------------------

    def add_spans(self, spans: Iterable[Span]) -> int:
        return self._keep(self.spans, self._trace_spans, self.max_spans, spans)

    def add_logs(self, logs: Iterable[Log]) -> int:
        return self._keep(self.logs, self._trace_logs, self.max_logs, logs)

    def _keep(
        self,
        window: deque[Any],
        by_trace: dict[str, list[Any]],
        limit: int,
        items: Iterable[Span] | Iterable[Log],
    ) -> int:
        """Append to a window, the oldest falling out of it and of its trace's index."""
        added = 0
        for item in items:
            if len(window) >= limit:
                old = window.popleft()
                if old.trace_id:
                    _unindex(by_trace, old.trace_id, old)
            window.append(item)
            if item.trace_id:  # a log line outside any request has none
                by_trace.setdefault(item.trace_id, []).append(item)
            self.service(item.service)
            added += 1
        if added:
            self.changed()
        return added

    def add_histograms(self, histograms: Iterable[Histogram]) -> None:
        for histogram in histograms:
            state = self.service(histogram.service)
            if histogram.version:
                state.version = histogram.version
            if not histogram.cumulative:  # a delta export: keep the running sum
                total = state.totals
                if total is None or total.bounds != histogram.bounds:
                    total = state.totals = Histogram(
                        histogram.service,
                        histogram.version,
                        0,
                        0,
                        0,
                        histogram.bounds,
                        [0] * len(histogram.buckets),
                        True,
                    )
                total.time = histogram.time
                total.count += histogram.count
                total.errors += histogram.errors
                total.buckets = [
                    a + b for a, b in zip(total.buckets, histogram.buckets, strict=True)
                ]
                histogram = Histogram(
                    total.service,
                    total.version,
                    total.time,
                    total.count,
                    total.errors,
                    total.bounds,
                    list(total.buckets),
                    True,
                )
            if state.latest is not None and histogram.count < state.latest.count:
                state.previous = None  # the service restarted: its counters did too
            else:
                state.previous = state.latest
            state.latest = histogram
            self.changed()

    # -- queries --------------------------------------------------------------------

    def requests(
        self,
        service: str | None = None,
        status: str | None = None,
        route: str | None = None,
        uid: str | None = None,
        trace_id: str | None = None,
        limit: int = 200,
        probes: bool = False,
    ) -> list[dict[str, Any]]:
        """The latest access lines, newest first, filtered.

        ``status`` is a code (``404``) or a class (``5xx``). Probes and scrapes
        (``/health/*``, ``/metrics``: kiban dev itself polls them) only with ``probes``.
        """
        out = []
        for log in reversed(self.logs):
            attributes = log.attributes
            if attributes.get("log") != "access":
                continue
            if not probes and attributes.get("path") in PROBE_PATHS:
                continue
            if service and log.service != service:
                continue
            if trace_id and log.trace_id != trace_id:
                continue
            if route and route not in str(attributes.get("route") or attributes.get("path")):
                continue
            if uid and str(attributes.get("uid")) != uid:
                continue
            if status and not _status_matches(attributes.get("status"), status):
                continue
            out.append(
                {
                    "time": log.time,
                    "service": log.service,
                    "trace_id": log.trace_id,
                    "span_id": log.span_id,
                    **{key: attributes.get(key) for key in _REQUEST_FIELDS},
                }
            )
            if len(out) >= limit:
                break
        return out

    def search_logs(
        self,
        level: str | None = None,
        service: str | None = None,
        trace_id: str | None = None,
        text: str | None = None,
        limit: int = 200,
    ) -> list[dict[str, Any]]:
        """Log lines, newest first: at ``level`` or above, of a service or trace, with text."""
        floor = _LEVELS.get(level or "", 0)
        needle = (text or "").lower()
        out = []
        source: Iterable[Log] = (
            reversed(self._trace_logs.get(trace_id, [])) if trace_id else reversed(self.logs)
        )
        for log in source:
            if floor and _LEVELS.get(log.level, 20) < floor:
                continue
            if service and log.service != service:
                continue
            if needle and needle not in log.message.lower() and not _in_attributes(needle, log):
                continue
            out.append(log.as_dict())
            if len(out) >= limit:
                break
        return out

    def trace(self, trace_id: str) -> dict[str, Any] | None:
        """One trace: its spans in start order with their depth, and its log lines."""
        spans = sorted(self._trace_spans.get(trace_id, []), key=lambda span: span.start)
        logs = sorted(self._trace_logs.get(trace_id, []), key=lambda log: log.time)
        if not spans and not logs:
            return None
        ids = {span.span_id for span in spans}
        children: dict[str, list[Span]] = {}
        roots = []
        for span in spans:
            if span.parent_id and span.parent_id in ids:
                children.setdefault(span.parent_id, []).append(span)
            else:
                roots.append(span)
        ordered: list[dict[str, Any]] = []

        def walk(span: Span, depth: int) -> None:
            entry = span.as_dict()
            entry["depth"] = depth
            ordered.append(entry)
            for child in children.get(span.span_id, []):
                walk(child, depth + 1)

        for root in roots:
            walk(root, 0)
        start = min([span.start for span in spans] + [log.time for log in logs if log.time])
        end = max([span.end for span in spans] + [log.time for log in logs])
        return {
            "trace_id": trace_id,
            "start": start,
            "duration_ms": round((end - start) / 1e6, 3),
            "services": sorted({span.service for span in spans} | {log.service for log in logs}),
            "errors": sum(1 for span in spans if span.status == "error"),
            "spans": ordered,
            "logs": [log.as_dict() for log in logs],
        }

    def traces(self, limit: int = 50) -> list[dict[str, Any]]:
        """The latest traces' roots, newest first."""
        out = []
        seen = set()
        for span in reversed(self.spans):
            if span.trace_id in seen:
                continue
            seen.add(span.trace_id)
            spans = self._trace_spans[span.trace_id]
            root = min(spans, key=lambda each: each.start)
            out.append(
                {
                    "trace_id": span.trace_id,
                    "name": root.name,
                    "service": root.service,
                    "start": root.start,
                    "spans": len(spans),
                    "errors": sum(1 for each in spans if each.status == "error"),
                    "services": sorted({each.service for each in spans}),
                }
            )
            if len(out) >= limit:
                break
        return out

    def service_map(self) -> dict[str, Any]:
        """Who calls whom: an edge per (caller, callee) with calls and errors.

        A client span whose child is another service's server span is a call between
        two services; a client span without one is a call to a dependency, named by
        what its attributes say it is (database, peer address, RPC service).
        """
        by_id = {span.span_id: span for span in self.spans}
        called: set[str] = set()
        edges: dict[tuple[str, str], dict[str, Any]] = {}

        def count(source: str, target: str, failed: bool, duration: int, kind: str) -> None:
            edge = edges.setdefault(
                (source, target),
                {
                    "source": source,
                    "target": target,
                    "calls": 0,
                    "errors": 0,
                    "kind": kind,
                    "_ns": 0,
                },
            )
            edge["calls"] += 1
            edge["errors"] += failed
            edge["_ns"] += duration

        for span in self.spans:
            if span.kind != "server" or not span.parent_id:
                continue
            parent = by_id.get(span.parent_id)
            if parent is None or parent.service == span.service:
                continue
            called.add(parent.span_id)
            failed = parent.status == "error" or span.status == "error"
            count(parent.service, span.service, failed, parent.end - parent.start, "service")
        addresses = _addresses(self.services.values())
        for span in self.spans:
            if span.kind != "client" or span.span_id in called:
                continue
            target = _dependency(span.attributes, addresses)
            if target is None:
                continue
            kind = "service" if target in self.services else "dependency"
            count(span.service, target, span.status == "error", span.end - span.start, kind)
        nodes: dict[str, dict[str, Any]] = {
            name: {"id": name, "kind": "service"} for name in self.services
        }
        for edge in edges.values():
            nodes.setdefault(edge["target"], {"id": edge["target"], "kind": "dependency"})
            edge["mean_ms"] = round(edge.pop("_ns") / edge["calls"] / 1e6, 3)
            edge["error_rate"] = round(edge["errors"] / edge["calls"], 4)
        return {"nodes": list(nodes.values()), "edges": list(edges.values())}


PROBE_PATHS = frozenset({"/health/liveness", "/health/readiness", "/metrics"})
_REQUEST_FIELDS = (
    "method",
    "path",
    "route",
    "status",
    "latency_s",
    "uid",
    "api_client",
    "user_ip",
    "request_id",
    "interrupted",
)
_LEVELS = {
    "trace": 5,
    "debug": 10,
    "info": 20,
    "warning": 30,
    "warn": 30,
    "error": 40,
    "critical": 50,
}


def _status_matches(status: Any, wanted: str) -> bool:
    wanted = wanted.strip().lower()
    if len(wanted) == 3 and wanted.endswith("xx"):
        return str(status)[:1] == wanted[0]
    return str(status) == wanted


def _in_attributes(needle: str, log: Log) -> bool:
    return any(needle in str(value).lower() for value in log.attributes.values())


def _addresses(services: Iterable[ServiceState]) -> dict[str, str]:
    """``host:port`` of each service kiban dev runs: a call there is a call to it."""
    out = {}
    for state in services:
        if state.url:
            port = state.url.rsplit(":", 1)[-1]
            for host in ("127.0.0.1", "localhost", "::1", "[::1]"):
                out[f"{host}:{port}"] = state.name
    return out


def _dependency(attributes: dict[str, Any], addresses: dict[str, str]) -> str | None:
    system = attributes.get("db.system.name") or attributes.get("db.system")
    if system:
        return str(system)
    service = attributes.get("rpc.service")
    if service:
        return str(service)
    host = attributes.get("server.address")
    if host:
        port = attributes.get("server.port")
        address = f"{host}:{port}" if port else str(host)
        return addresses.get(address, address)
    return None


def _unindex(index: dict[str, list[Any]], key: str, item: Any) -> None:
    items = index.get(key)
    if items is None:
        return
    if items[0] is item:  # the window drops its oldest: first in its trace's list too
        del items[0]
    else:
        for position, each in enumerate(items):
            if each is item:
                del items[position]
                break
    if not items:
        del index[key]
