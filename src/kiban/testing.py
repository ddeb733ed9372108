"""Testing kiban services: helpers and pytest fixtures for service authors.

Turn the fixtures on in the service's top ``conftest.py``::

    pytest_plugins = ["kiban.testing"]

- ``kiban_keys``: throwaway Ed25519 keys; ``kiban_keys.jwt()`` and
  ``kiban_keys.internal_id_token()`` make schemes that trust them,
  ``kiban_keys.bearer("ada", "orders:read")`` the headers a caller would send.
- ``kiban_logs``: every line kiban writes during the test, as dicts
  (``.access()``, ``.messages()``).
- ``capture_spans(service)``: the service's finished spans, in memory.
- ``grpc_channel(app)``: a channel to the started app's own gRPC server.
- ``downstream(service, handler)``: the service's kiban HTTP clients answer from
  ``handler`` instead of the network. Only the innermost transport is replaced, so
  propagation, retries, the breaker, deadlines and client spans still run.

Apps are tested with Starlette's ``TestClient`` used as a context manager, which runs
the lifespan: kiban's start-up (security resolution, migrations, the gRPC server) and
its cleanups.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import httpx
import orjson

try:
    import pytest
except ImportError:  # pragma: no cover (a test helper without the test runner)
    raise ImportError("kiban.testing is for tests: pip install pytest") from None
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from kiban import _extras
from kiban import _log as log

if TYPE_CHECKING:
    from kiban._app import Service
    from kiban.security import JWT, InternalIDToken

__all__ = [
    "CapturedLogs",
    "Keys",
    "capture_logs",
    "capture_spans",
    "client",
    "downstream",
    "grpc_channel",
    "kiban_keys",
    "kiban_logs",
]


class Keys:
    """A throwaway Ed25519 key pair and the schemes and tokens that go with it."""

    def __init__(self, issuer: str = "kiban-test") -> None:
        _extras.require("cryptography", "jwt", "kiban.testing's keys")
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519

        key = ed25519.Ed25519PrivateKey.generate()
        self.issuer = issuer
        self.private_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self.public_pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def jwt(self, **options: Any) -> JWT:
        """A JWT scheme trusting these keys (``options`` as for ``kiban.security.JWT``)."""
        from kiban.security import JWT

        options.setdefault("issuer", self.issuer)
        return JWT(algorithms=["EdDSA"], key=self.public_pem, **options)

    def internal_id_token(self, **options: Any) -> InternalIDToken:
        """A gateway identity-token scheme trusting these keys."""
        from kiban.security import InternalIDToken

        options.setdefault("issuer", self.issuer)
        return InternalIDToken(key=self.public_pem, **options)

    def token(self, subject: str, *scopes: str, **options: Any) -> str:
        """A token signed with these keys (``ttl``, ``audience``, ``claims``... as ``mint``)."""
        from kiban.security._tokens import mint

        options.setdefault("issuer", self.issuer)
        return mint(self.private_pem, subject, scopes=scopes, **options)

    def bearer(self, subject: str, *scopes: str, **options: Any) -> dict[str, str]:
        """``Authorization: Bearer`` headers for ``subject`` holding ``scopes``."""
        return {"authorization": f"Bearer {self.token(subject, *scopes, **options)}"}

    def identity(
        self, subject: str, *scopes: str, header: str = "x-internal-id-token"
    ) -> dict[str, str]:
        """The gateway's identity-token header for ``subject`` (holding ``scopes``)."""
        return {header: self.token(subject, *scopes)}


class CapturedLogs:
    """The lines kiban wrote, parsed."""

    def __init__(self, stream: io.BytesIO) -> None:
        self.stream = stream

    def lines(self) -> list[dict[str, Any]]:
        log.sink.flush()
        return [orjson.loads(line) for line in self.stream.getvalue().splitlines() if line]

    def access(self) -> list[dict[str, Any]]:
        """The access lines, one a request."""
        return [line for line in self.lines() if line.get("log") == "access"]

    def messages(self) -> list[str]:
        """The messages of the other lines, in order."""
        return [line["msg"] for line in self.lines() if "msg" in line]


@contextmanager
def capture_logs(level: str = "debug") -> Iterator[CapturedLogs]:
    """Send kiban's lines (JSON) to memory for the block; the previous sink after it."""
    previous = log.sink.stream
    stream = io.BytesIO()
    log.sink.flush()
    level_before = log.get_level()
    log.configure(level, "json", stream=stream)
    try:
        yield CapturedLogs(stream)
    finally:
        log.sink.flush()
        log.configure(level_before, "json", stream=previous)


@contextmanager
def client(app: Any, peer: tuple[str, int] = ("127.0.0.1", 50000), **options: Any) -> Iterator[Any]:
    """A Starlette ``TestClient`` with the app started (its lifespan, so kiban's start-up:
    security resolved, migrations run, the gRPC server up) and stopped after the block.

    ``peer`` is the caller's address (a ``TRUSTED_PROXIES`` one to act as the gateway).
    """
    from starlette.testclient import TestClient

    with TestClient(app, client=peer, **options) as started:
        yield started


def capture_spans(service: Service) -> InMemorySpanExporter:
    """The spans ``service`` finishes from now on, kept in memory as they end."""
    exporter = InMemorySpanExporter()
    service.telemetry.tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


@contextmanager
def grpc_channel(app: Any) -> Iterator[Any]:
    """A ``grpc.Channel`` to the gRPC server of a started app (inside ``client(app)``).

    The server is the service's own, started by its lifespan on ``GRPC_PORT`` (``0`` in
    tests picks a free port), so every call runs through kiban's chassis: metadata read
    under the trust rules, security, limits, the access line and the status mapping.
    """
    _extras.require("grpc_health", "grpc", "kiban.testing's gRPC channel")
    import grpc

    from kiban._app import Service

    port = Service.of(app).grpc.port
    if port is None:
        raise RuntimeError(
            "the app's gRPC server is not running: add a servicer, then open the channel "
            "inside `with kiban.testing.client(app)`"
        )
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel


def downstream(
    service: Service,
    handler: Callable[[httpx.Request], httpx.Response],
    base_url: str | None = None,
) -> None:
    """Answer the service's kiban HTTP clients (those of ``base_url``, or all) from
    ``handler``; what kiban does around each call still runs."""
    for client, transport in service.http_clients:
        if base_url is None or str(client.base_url).rstrip("/") == base_url.rstrip("/"):
            transport.inner = httpx.MockTransport(handler)


@pytest.fixture(scope="session")
def kiban_keys() -> Keys:
    """Throwaway keys for the test session (see ``Keys``)."""
    return Keys()


@pytest.fixture
def kiban_logs() -> Iterator[CapturedLogs]:
    """kiban's log lines during the test, as dicts."""
    with capture_logs() as captured:
        yield captured
