"""Log lines as OTLP logs: what a service writes to stdout, sent to its collector too.

With ``OTLP_LOGS=true`` (and ``OTLP_ENDPOINT``) every line the service writes, access
lines included, also goes to the collector as an OTLP log record: its level as the
severity, ``msg`` as the body, ``trace_id``/``span_id`` as the record's trace context
and every other field as an attribute. A collector (or ``kiban dev``'s dashboard) then
joins logs to traces without parsing stdout.

Why not the OTel SDK's log pipeline: it is still private (``opentelemetry.sdk._logs``)
and its record types change between minor releases. kiban's lines are structured
already, so they are encoded with the public OTLP messages (``opentelemetry-proto``,
which the OTLP exporters depend on) and sent as the SDK's exporters send theirs:
HTTP/protobuf ``POST /v1/logs`` or the gRPC ``LogsService``.

Lines are queued and sent by one thread, in batches: a request never waits on the
collector. A full queue drops the oldest lines, and a failed export drops its batch;
both are counted (``dropped``), never logged (that line would be exported too).
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson

if TYPE_CHECKING:
    from kiban._config import Settings

__all__ = ["LogExporter"]

_SEVERITIES = {"debug": 5, "info": 9, "warning": 13, "warn": 13, "error": 17, "critical": 21}
#: Fields that are the record itself, not its attributes.
_RECORD_FIELDS = frozenset({"time", "level", "msg", "trace_id", "span_id"})


class LogExporter:
    """Queues log lines and sends them to the collector in batches, from a thread."""

    def __init__(self, settings: Settings, resource: dict[str, str], max_queue: int = 8192) -> None:
        from opentelemetry.proto.common.v1 import common_pb2
        from opentelemetry.proto.resource.v1 import resource_pb2

        self._pb = common_pb2
        self._resource = resource_pb2.Resource(
            attributes=[_attribute(key, value) for key, value in resource.items()]
        )
        self._endpoint = str(settings.otlp_endpoint)
        self._protocol = settings.otlp_protocol
        self._delay = settings.trace_export_delay
        self._batch = settings.trace_export_batch
        self._queue: deque[bytes] = deque()
        self._max_queue = max_queue
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._closed = False
        self._send = self._sender()
        self.dropped = 0
        self.sent = 0
        self._thread = threading.Thread(target=self._run, name="kiban-otlp-logs", daemon=True)
        self._thread.start()

    def offer(self, line: bytes) -> None:
        """Queue one line (called for every line the sink writes: kept cheap)."""
        if self._closed:
            return
        with self._lock:
            if len(self._queue) >= self._max_queue:
                self._queue.popleft()
                self.dropped += 1
            self._queue.append(line)
            if len(self._queue) >= self._batch:
                self._wake.set()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Send what is queued, then stop the thread."""
        self._closed = True
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            self._wake.wait(self._delay)
            self._wake.clear()
            while True:
                with self._lock:
                    batch = [
                        self._queue.popleft() for _ in range(min(self._batch, len(self._queue)))
                    ]
                if not batch:
                    break
                try:
                    self._send(self._request(batch).SerializeToString())
                    self.sent += len(batch)
                except Exception:  # the collector is down or refused: drop, count
                    self.dropped += len(batch)
            if self._closed:
                return

    def _request(self, lines: list[bytes]) -> Any:
        from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
        from opentelemetry.proto.logs.v1 import logs_pb2

        records = [_record(logs_pb2, self._pb, line) for line in lines]
        return logs_service_pb2.ExportLogsServiceRequest(
            resource_logs=[
                logs_pb2.ResourceLogs(
                    resource=self._resource,
                    scope_logs=[
                        logs_pb2.ScopeLogs(
                            scope=self._pb.InstrumentationScope(name="kiban"), log_records=records
                        )
                    ],
                )
            ]
        )

    def _sender(self) -> Any:
        if self._protocol == "grpc":
            import grpc
            from opentelemetry.proto.collector.logs.v1 import (
                logs_service_pb2,
                logs_service_pb2_grpc,
            )

            parts = urlsplit(self._endpoint)
            target = f"{parts.hostname}:{parts.port or 4317}"
            channel = (
                grpc.secure_channel(target, grpc.ssl_channel_credentials())
                if parts.scheme == "https"
                else grpc.insecure_channel(target)
            )
            export = logs_service_pb2_grpc.LogsServiceStub(channel).Export  # type: ignore[no-untyped-call]

            def send_grpc(body: bytes) -> None:
                export(logs_service_pb2.ExportLogsServiceRequest.FromString(body), timeout=10)

            return send_grpc
        import httpx

        client = httpx.Client(timeout=10)
        url = self._endpoint.rstrip("/") + "/v1/logs"

        def send_http(body: bytes) -> None:
            response = client.post(
                url, content=body, headers={"content-type": "application/x-protobuf"}
            )
            response.raise_for_status()

        return send_http


def _attribute(key: str, value: Any) -> Any:
    from opentelemetry.proto.common.v1 import common_pb2

    return common_pb2.KeyValue(key=key, value=_value(common_pb2, value))


def _value(pb: Any, value: Any) -> Any:
    if isinstance(value, bool):
        return pb.AnyValue(bool_value=value)
    if isinstance(value, int) and -(2**63) <= value < 2**63:
        return pb.AnyValue(int_value=value)
    if isinstance(value, float):
        return pb.AnyValue(double_value=value)
    if isinstance(value, str):
        return pb.AnyValue(string_value=value)
    return pb.AnyValue(string_value=orjson.dumps(value, default=repr).decode())


def _hex(value: Any, length: int) -> bytes:
    if isinstance(value, str) and len(value) == length:
        try:
            return bytes.fromhex(value)
        except ValueError:
            pass
    return b""


def _record(logs_pb2: Any, pb: Any, line: bytes) -> Any:
    try:
        event = orjson.loads(line)
    except orjson.JSONDecodeError:
        event = None
    if not isinstance(event, dict):  # a console line: the text is the record
        return logs_pb2.LogRecord(body=pb.AnyValue(string_value=line.decode("utf-8", "replace")))
    level = str(event.get("level", "info"))
    timestamp = 0
    if isinstance(event.get("time"), str):
        with contextlib.suppress(ValueError):
            timestamp = int(datetime.fromisoformat(event["time"]).timestamp() * 1e9)
    message = event.get("msg")
    return logs_pb2.LogRecord(
        time_unix_nano=timestamp,
        observed_time_unix_nano=timestamp,
        severity_number=_SEVERITIES.get(level, 9),
        severity_text=level.upper(),
        body=_value(pb, message if message is not None else event.get("log", "")),
        trace_id=_hex(event.get("trace_id"), 32),
        span_id=_hex(event.get("span_id"), 16),
        attributes=[
            pb.KeyValue(key=key, value=_value(pb, value))
            for key, value in event.items()
            if key not in _RECORD_FIELDS and value is not None
        ],
    )
