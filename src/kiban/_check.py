"""``kiban check URL``: audit a running service against the kiban convention.

Each check prints a row, pass or fail, and the fix for a failure; the exit code is 1
when anything failed, so the command can gate a pipeline.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson

from kiban._accesslog import FIELDS

__all__ = ["Row", "Unreachable", "audit", "audit_grpc", "render"]

PROBLEM_JSON = "application/problem+json"
METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")


@dataclass(frozen=True)
class Row:
    check: str
    ok: bool
    detail: str
    fix: str = ""


def _liveness(client: httpx.Client) -> Iterable[Row]:
    response = client.get("/health/liveness")
    ok = response.status_code == 200 and response.headers.get("content-type", "").startswith(
        "application/json"
    )
    yield Row(
        "liveness",
        ok,
        f"GET /health/liveness -> {response.status_code}",
        "serve GET /health/liveness (kiban.Service does) answering 200 without "
        "touching dependencies",
    )


def _readiness(client: httpx.Client) -> Iterable[Row]:
    response = client.get("/health/readiness")
    try:
        body = response.json()
    except ValueError:
        body = {}
    ok = response.status_code in (200, 503) and isinstance(body.get("checks"), dict)
    detail = f"GET /health/readiness -> {response.status_code}"
    if ok:
        failing = [name for name, check in body["checks"].items() if check.get("status") != "ok"]
        detail += f", dependencies: {', '.join(body['checks']) or 'none'}"
        if failing:
            detail += f" (failing: {', '.join(failing)})"
    yield Row(
        "readiness",
        ok,
        detail,
        "serve GET /health/readiness pinging each dependency (service.add_pinger)",
    )


def _problems(client: httpx.Client) -> Iterable[Row]:
    path = f"/kiban-check-{uuid.uuid4().hex}"
    response = client.get(path)
    try:
        body = response.json()
    except ValueError:
        body = {}
    ok = (
        response.status_code == 404
        and response.headers.get("content-type") == PROBLEM_JSON
        and body.get("status") == 404
    )
    yield Row(
        "errors are problem+json",
        ok,
        f"GET {path[:24]}... -> {response.status_code} {response.headers.get('content-type', '-')}",
        "install kiban's error handlers (kiban.Service) so every error is RFC 9457",
    )


def _security(client: httpx.Client) -> Iterable[Row]:
    response = client.get("/openapi.json")
    if response.status_code != 200:
        yield Row(
            "security declared",
            False,
            f"GET /openapi.json -> {response.status_code}",
            "serve the OpenAPI document at /openapi.json",
        )
        return
    document = response.json()
    undeclared = [
        f"{method.upper()} {path}"
        for path, item in document.get("paths", {}).items()
        for method, operation in item.items()
        if method in METHODS and "security" not in operation and "security" not in document
    ]
    yield Row(
        "security declared",
        not undeclared,
        "every operation declares security"
        if not undeclared
        else f"no security on {', '.join(undeclared[:5])}"
        + (f" and {len(undeclared) - 5} more" if len(undeclared) > 5 else ""),
        "declare Security(...) or NoSecurity() on each route, router or the API",
    )


def _metrics(client: httpx.Client) -> Iterable[Row]:
    response = client.get("/metrics")
    ok = response.status_code == 200 and "http_server_request_duration_seconds" in response.text
    yield Row(
        "metrics",
        ok,
        f"GET /metrics -> {response.status_code}",
        "expose Prometheus metrics with http_server_request_duration_seconds",
    )


def _trace(client: httpx.Client) -> Iterable[Row]:
    """A trusted peer's trace id is taken and echoed; anyone else's is replaced by a
    fresh one (the trust boundary), which is echoed too. No id at all fails."""
    trace_id = uuid.uuid4().hex
    response = client.get("/health/liveness", headers={"x-trace-id": trace_id})
    echoed = response.headers.get("x-trace-id")
    if echoed == trace_id:
        detail = f"sent {trace_id[:8]}..., echoed: this checker is a trusted peer"
    elif echoed:
        detail = f"sent {trace_id[:8]}..., got a new {echoed[:8]}...: not a trusted peer"
    else:
        detail = f"sent {trace_id[:8]}..., got nothing"
    yield Row(
        "trace id propagated",
        echoed is not None and re.fullmatch(r"[0-9a-f]{32}", echoed) is not None,
        detail,
        "read x-trace-id into the request context and echo it (kiban.Service does)",
    )


def _headers(client: httpx.Client) -> Iterable[Row]:
    response = client.get("/health/liveness")
    wanted = {
        "x-content-type-options": "nosniff",
        "x-frame-options": "DENY",
        "referrer-policy": "no-referrer",
    }
    missing = [name for name, value in wanted.items() if response.headers.get(name) != value]
    yield Row(
        "security headers",
        not missing,
        "present" if not missing else f"missing {', '.join(missing)}",
        "send nosniff, frame and referrer headers (kiban.Service does)",
    )


def _access_log(log: Path) -> Iterable[Row]:
    lines = []
    for raw in log.read_bytes().splitlines():
        try:
            line = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        if isinstance(line, dict) and line.get("log") == "access":
            lines.append(line)
    wrong = [line for line in lines if tuple(line) != FIELDS]
    ok = bool(lines) and not wrong
    detail = (
        f"{len(lines)} access lines, all in the schema"
        if ok
        else "no access lines"
        if not lines
        else f"{len(wrong)} of {len(lines)} lines differ from the schema"
    )
    yield Row(
        "access log schema",
        ok,
        detail,
        "write one access line per request with kiban's fixed fields",
    )


CHECKS: tuple[Callable[[httpx.Client], Iterable[Row]], ...] = (
    _liveness,
    _readiness,
    _problems,
    _security,
    _metrics,
    _trace,
    _headers,
)


class Unreachable(Exception):
    """Nothing answers HTTP at the URL: there is nothing to audit."""


def audit(url: str, log: Path | None = None, timeout: float = 5.0) -> list[Row]:
    """One row per finding. Whatever the service answers, a row, never an exception.

    Raises ``Unreachable`` when no HTTP server answers at all (a different outcome
    from a service that answers wrongly).
    """
    rows: list[Row] = []
    try:
        client = httpx.Client(base_url=url.rstrip("/"), timeout=timeout)
    except (httpx.InvalidURL, httpx.UnsupportedProtocol, ValueError) as exc:
        raise Unreachable(f"not an HTTP URL ({exc})") from None
    with client:
        try:
            client.get("/")
        except (httpx.TransportError, httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
            raise Unreachable(type(exc).__name__) from None
        for check in CHECKS:
            name = check.__name__.strip("_").replace("_", " ")
            try:
                rows.extend(check(client))
            except httpx.HTTPError as exc:
                rows.append(
                    Row(name, False, f"request failed: {type(exc).__name__}", "is it overloaded?")
                )
            except Exception as exc:  # an answer of a shape the check did not expect
                rows.append(
                    Row(
                        name,
                        False,
                        f"unexpected answer ({type(exc).__name__})",
                        "answer as kiban.Service does: JSON bodies, problem+json errors",
                    )
                )
    if log is not None:
        rows.extend(_access_log(log))
    return rows


def audit_grpc(target: str, timeout: float = 5.0) -> list[Row]:
    """The gRPC side (``host:port``): health, reflection, and how an unauthenticated
    call to each unary method is answered. Needs ``kiban[grpc]``."""
    import grpc
    from google.protobuf import descriptor_pb2
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    rows: list[Row] = []
    with grpc.insecure_channel(target) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise Unreachable(f"no gRPC server at {target}") from None
        try:
            health: Any = health_pb2_grpc.HealthStub(channel)  # the stubs' types are partial
            answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
            rows.append(Row("grpc health", True, f"grpc.health.v1 Check -> {status}"))
        except grpc.RpcError as exc:
            rows.append(
                Row(
                    "grpc health",
                    False,
                    f"grpc.health.v1 Check -> {exc.code().name}",
                    "serve grpc.health.v1 (kiban's gRPC server does, from readiness)",
                )
            )
        reflection: Any = reflection_pb2_grpc.ServerReflectionStub(channel)

        def ask(request: reflection_pb2.ServerReflectionRequest) -> Any:
            return next(iter(reflection.ServerReflectionInfo(iter([request]), timeout=timeout)))

        try:
            listed = ask(reflection_pb2.ServerReflectionRequest(list_services=""))
            services = [s.name for s in listed.list_services_response.service]
        except grpc.RpcError as exc:
            rows.append(
                Row(
                    "grpc reflection",
                    False,
                    f"ServerReflectionInfo -> {exc.code().name}",
                    "enable server reflection (kiban's gRPC server does)",
                )
            )
            return rows
        own = [name for name in services if not name.startswith("grpc.")]
        rows.append(Row("grpc reflection", True, f"services: {', '.join(own) or 'none'}"))
        for service in own:
            found = ask(reflection_pb2.ServerReflectionRequest(file_containing_symbol=service))
            methods: list[str] = []
            for raw in found.file_descriptor_response.file_descriptor_proto:
                proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
                prefix = f"{proto.package}." if proto.package else ""
                for declared in proto.service:
                    if prefix + declared.name != service:
                        continue
                    methods += [
                        m.name
                        for m in declared.method
                        if not m.client_streaming and not m.server_streaming
                    ]
            for method in methods:
                rows.append(_unauthenticated_call(channel, f"/{service}/{method}", timeout))
    return rows


def _unauthenticated_call(channel: Any, path: str, timeout: float) -> Row:
    """An empty request with no credentials: refused with details, or served; never a bug."""
    import grpc
    from grpc_status import rpc_status

    call = channel.unary_unary(path)
    try:
        call(b"", timeout=timeout)
    except grpc.RpcError as exc:
        code = exc.code()
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            detailed = rpc_status.from_call(exc) is not None  # type: ignore[arg-type]
            return Row(
                "grpc security",
                detailed,
                f"{path} without credentials -> {code.name}"
                + ("" if detailed else " without google.rpc.Status details"),
                "refuse with kiban's security (it adds the details)",
            )
        ok = code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
        return Row(
            "grpc security",
            ok,
            f"{path} (public) with an empty request -> {code.name}",
            "an empty or invalid request is INVALID_ARGUMENT or NOT_FOUND, never a bug",
        )
    return Row("grpc security", True, f"{path} (public) with an empty request -> OK")


def render(rows: list[Row]) -> str:
    width = max(len(row.check) for row in rows)
    lines = [f"{'check':<{width}}  result  detail", f"{'-' * width}  ------  ------"]
    for row in rows:
        lines.append(f"{row.check:<{width}}  {'pass' if row.ok else 'FAIL':<6}  {row.detail}")
        if not row.ok and row.fix:
            lines.append(f"{'':<{width}}          fix: {row.fix}")
    failed = sum(not row.ok for row in rows)
    lines.append(f"{len(rows) - failed} passed, {failed} failed")
    return "\n".join(lines)
