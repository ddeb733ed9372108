"""Real receivers that services under test export to: OTLP (gRPC and HTTP) and Sentry."""

from __future__ import annotations

import gzip
import json
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tests.conftest import free_port


def value_of(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


def attributes(items: Any) -> dict[str, Any]:
    return {item.key: value_of(item.value) for item in items}


class ReceivedSpan:
    """A span as the collector got it, with its resource's attributes."""

    def __init__(self, span: Span, resource: list[KeyValue]) -> None:
        self.name = span.name
        self.kind = span.kind
        self.trace_id = span.trace_id.hex()
        self.span_id = span.span_id.hex()
        self.parent_span_id = span.parent_span_id.hex()
        self.attributes = attributes(span.attributes)
        self.resource = attributes(resource)
        self.status_code = span.status.code

    def __repr__(self) -> str:
        return f"<span {self.name} {self.trace_id}/{self.span_id}<-{self.parent_span_id}>"


class OTLPReceiver:
    """An OTLP collector on loopback, speaking gRPC and HTTP/protobuf."""

    def __init__(self) -> None:
        self.trace_requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.metric_requests: list[metrics_service_pb2.ExportMetricsServiceRequest] = []
        self.grpc_port = free_port()
        self.http_port = free_port()
        self._lock = threading.Lock()

    # gRPC services
    def _trace_export(self, request: Any, context: Any) -> Any:
        with self._lock:
            self.trace_requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def _metric_export(self, request: Any, context: Any) -> Any:
        with self._lock:
            self.metric_requests.append(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()

    def start(self) -> None:
        receiver = self

        class Traces(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                return receiver._trace_export(request, context)

        class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                return receiver._metric_export(request, context)

        self.grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), self.grpc_server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), self.grpc_server)
        self.grpc_server.add_insecure_port(f"127.0.0.1:{self.grpc_port}")
        self.grpc_server.start()

        def export(method: str, path: str, headers: Any, body: bytes) -> Reply:
            reply: Any
            if path == "/v1/traces":
                receiver._trace_export(
                    trace_service_pb2.ExportTraceServiceRequest.FromString(body), None
                )
                reply = trace_service_pb2.ExportTraceServiceResponse()
            else:
                receiver._metric_export(
                    metrics_service_pb2.ExportMetricsServiceRequest.FromString(body), None
                )
                reply = metrics_service_pb2.ExportMetricsServiceResponse()
            return 200, "application/x-protobuf", reply.SerializeToString()

        self.http_server = serve(export, self.http_port)

    def stop(self) -> None:
        self.grpc_server.stop(grace=None)
        self.http_server.shutdown()

    @property
    def grpc_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.grpc_port}"

    @property
    def http_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            requests = list(self.trace_requests)
        return [
            ReceivedSpan(span, list(resource_spans.resource.attributes))
            for request in requests
            for resource_spans in request.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]

    def metric_names(self) -> set[str]:
        with self._lock:
            requests = list(self.metric_requests)
        return {
            metric.name
            for request in requests
            for resource_metrics in request.resource_metrics
            for scope_metrics in resource_metrics.scope_metrics
            for metric in scope_metrics.metrics
        }

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 15) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = predicate()
            if result:
                return result
            time.sleep(0.1)
        raise AssertionError(f"not received within {timeout}s: {self.spans()}")


Reply = tuple[int, str, bytes]


def serve(handle: Callable[[str, str, Any, bytes], Reply], port: int = 0) -> ThreadingHTTPServer:
    """A real HTTP server on loopback, in a thread.

    ``handle(method, path, headers, body)`` gives (status, content type, body); the
    request body arrives decompressed.
    """

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = _decoded(self.rfile.read(length), self.headers.get("content-encoding"))
            status, content_type, data = handle(self.command, self.path, self.headers, body)
            self.send_response(status)
            if content_type:
                self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _answer

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _decoded(body: bytes, encoding: str | None) -> bytes:
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    return body


class SentryReceiver:
    """Stands in for the Sentry host of a DSN and keeps every event envelope it gets."""

    def __init__(self, delay: float = 0.0) -> None:
        self.port = free_port()
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        #: Seconds each envelope waits for its answer, once kept: a slow Sentry.
        self.delay = delay

    @property
    def dsn(self) -> str:
        return f"http://publickey@127.0.0.1:{self.port}/1"

    def start(self) -> None:
        receiver = self

        def envelope(method: str, path: str, headers: Any, body: bytes) -> Reply:
            items = [json.loads(line) for line in body.splitlines() if line.strip()]
            with receiver._lock:
                receiver.events.extend(
                    item for item in items[1:] if "exception" in item or "tags" in item
                )
            time.sleep(receiver.delay)
            return 200, "application/json", b"{}"

        self.server = serve(envelope, self.port)

    def stop(self) -> None:
        self.server.shutdown()


def running(receiver: Any) -> Iterator[Any]:
    receiver.start()
    try:
        yield receiver
    finally:
        receiver.stop()
