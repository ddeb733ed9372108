"""gRPC on the chassis, against real ``kiban run`` processes on loopback (tests/apps/probe.py)."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from hypothesis import given
from hypothesis import strategies as st

from kiban._rpc import _metadata_headers, peer_ip
from tests.apps.rpc import probe_pb2 as pb
from tests.apps.rpc import probe_pb2_grpc as pbg
from tests.conftest import free_port, token

pytestmark = pytest.mark.process

APP = "tests.apps.probe:create_app"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


class Probe:
    """A running probe service: its process, a stub, and its lines."""

    def __init__(self, process: Any, port: int) -> None:
        self.process = process
        self.port = port
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(self.channel).result(timeout=10)
        self.stub = pbg.ProbeStub(self.channel)

    def access(self, method: str) -> list[dict[str, Any]]:
        return [
            line
            for line in self.process.lines()
            if line.get("log") == "access" and line["path"] == f"/probe.v1.Probe/{method}"
        ]


@pytest.fixture
def probe(spawn: Any) -> Iterator[Probe]:
    port = free_port()
    process = spawn(APP, GRPC_PORT=str(port), TRUSTED_PROXIES="127.0.0.1")
    running = Probe(process, port)
    yield running
    running.channel.close()


def reader(*scopes: str, subject: str = "ada") -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token('jwt', subject, *scopes)}")]


def details(error: grpc.RpcError) -> list[Any]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    found = []
    for detail in status.details:
        for kind in (error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                found.append(message)
    return found


def test_a_call_gets_the_request_context_and_one_access_line(probe: Probe) -> None:
    seen = probe.stub.Whoami(
        pb.Empty(),
        metadata=[*reader("probe:read"), ("x-trace-id", TRACE), ("x-user-ip", "203.0.113.9")],
    )
    assert seen.trace_id == TRACE  # from a trusted peer, the header's word
    assert seen.uid == "ada"  # from the verified token, never from a header
    assert seen.user_ip == "203.0.113.9"
    time.sleep(0.3)
    (line,) = probe.access("Whoami")
    assert line["method"] == "POST"
    assert line["route"] == "/probe.v1.Probe/Whoami"
    assert (line["status"], line["grpc_status"]) == (200, "OK")
    assert (line["trace_id"], line["uid"], line["user_ip"]) == (TRACE, "ada", "203.0.113.9")
    assert line["span_id"]
    assert line["request_id"] == seen.request_id


def test_an_untrusted_peer_decides_no_identity_and_no_trace_id(spawn: Any) -> None:
    port = free_port()
    probe = Probe(spawn(APP, GRPC_PORT=str(port)), port)  # loopback not trusted here
    seen = probe.stub.Limited(
        pb.Empty(), metadata=[("x-uid", "mallory"), ("x-trace-id", TRACE), ("x-user-ip", "1.2.3.4")]
    )
    assert (seen.uid, seen.user_ip) == ("", "127.0.0.1")
    assert seen.trace_id != TRACE


def test_a_synchronous_method_runs_on_a_thread_with_the_calls_context(probe: Probe) -> None:
    seen = probe.stub.Limited(pb.Empty(), metadata=[("x-uid", "ada"), ("x-trace-id", TRACE)])
    assert (seen.uid, seen.trace_id) == ("ada", TRACE)
    time.sleep(0.3)
    (line,) = probe.access("Limited")
    assert (line["uid"], line["trace_id"], line["grpc_status"]) == ("ada", TRACE, "OK")


def test_missing_and_insufficient_credentials_are_refused_with_details(probe: Probe) -> None:
    with pytest.raises(grpc.RpcError) as missing:
        probe.stub.Whoami(pb.Empty())
    assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
    (info,) = details(missing.value)
    assert info.metadata["http_status"] == "401"
    with pytest.raises(grpc.RpcError) as scoped:
        probe.stub.Whoami(pb.Empty(), metadata=reader("other:scope"))
    assert scoped.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    assert "probe:read" in scoped.value.details()  # type: ignore[attr-defined]
    time.sleep(0.3)
    statuses = [(line["status"], line["grpc_status"]) for line in probe.access("Whoami")]
    assert statuses == [(401, "UNAUTHENTICATED"), (403, "PERMISSION_DENIED")]


def test_a_rate_limit_is_resource_exhausted_with_retry_info(probe: Probe) -> None:
    probe.stub.Limited(pb.Empty())
    probe.stub.Limited(pb.Empty())
    with pytest.raises(grpc.RpcError) as over:
        probe.stub.Limited(pb.Empty())
    assert over.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    retry = [d for d in details(over.value) if isinstance(d, error_details_pb2.RetryInfo)]
    assert retry
    assert retry[0].retry_delay.seconds > 0


def test_a_bug_is_internal_and_leaks_nothing(probe: Probe) -> None:
    with pytest.raises(grpc.RpcError) as crashed:
        probe.stub.Crash(pb.Empty())
    assert crashed.value.code() == grpc.StatusCode.INTERNAL  # type: ignore[attr-defined]
    assert crashed.value.details() == "Internal error."  # type: ignore[attr-defined]
    assert "db-3" not in str(crashed.value.trailing_metadata())  # type: ignore[attr-defined]
    time.sleep(0.3)
    errors = [line for line in probe.process.lines() if line.get("msg") == "unhandled exception"]
    assert errors
    assert errors[0]["rpc"] == "/probe.v1.Probe/Crash"
    (line,) = probe.access("Crash")
    assert (line["status"], line["grpc_status"]) == (500, "INTERNAL")
    # The server goes on serving.
    assert probe.stub.Limited(pb.Empty()).trace_id


def test_messages_over_the_limit_are_refused(spawn: Any) -> None:
    port = free_port()
    process = spawn(APP, GRPC_PORT=str(port), GRPC_MAX_RECEIVE_BYTES="2048")
    probe = Probe(process, port)
    assert probe.stub.Echo(pb.Blob(data=b"x" * 1000)).data == b"x" * 1000
    with pytest.raises(grpc.RpcError) as big:
        probe.stub.Echo(pb.Blob(data=b"x" * 4096))
    assert big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    assert probe.stub.Echo(pb.Blob(data=b"ok")).data == b"ok"


def test_odd_and_oversized_metadata_never_crash_the_server(probe: Probe) -> None:
    odd = [
        ("x-trace-id", "not a trace id at all" * 5),
        ("x-user-ip", "<script>alert(1)</script>"),
        ("x-forwarded-for", ", , ,"),
        ("x-uid-bin", b"\xff\x00binary"),
        ("traceparent", "00-zz-yy-01"),
    ]
    seen = probe.stub.Limited(pb.Empty(), metadata=odd)
    assert len(seen.trace_id) == 32
    with pytest.raises(grpc.RpcError) as huge:
        probe.stub.Limited(pb.Empty(), metadata=[("x-trace-id", "a" * 64 * 1024)])
    assert huge.value.code() in (  # type: ignore[attr-defined]
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
    )
    assert probe.stub.Echo(pb.Blob(data=b"still here")).data == b"still here"


def _raw_call(port: int, metadata: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    """One call to ``Limited`` in HTTP/2 frames written by hand, its metadata sent as
    given (no grpc client sends malformed metadata); what came back, or how it ended."""
    import socket

    import h2.config
    import h2.connection
    import h2.events

    config = h2.config.H2Configuration(
        client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False
    )
    connection = h2.connection.H2Connection(config)
    outcome: dict[str, Any] = {"headers": {}, "ended": None}
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        connection.initiate_connection()
        stream = connection.get_next_available_stream_id()
        connection.send_headers(
            stream,
            [
                (b":method", b"POST"),
                (b":scheme", b"http"),
                (b":path", b"/probe.v1.Probe/Limited"),
                (b":authority", f"127.0.0.1:{port}".encode()),
                (b"content-type", b"application/grpc"),
                (b"te", b"trailers"),
                *metadata,
            ],
        )
        connection.send_data(stream, b"\x00\x00\x00\x00\x00", end_stream=True)  # Empty
        sock.sendall(connection.data_to_send())
        while outcome["ended"] is None:
            data = sock.recv(65536)
            if not data:
                outcome["ended"] = "closed"
                break
            for event in connection.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    outcome["headers"].update(
                        (bytes(name).decode(), bytes(value).decode("latin-1"))
                        for name, value in event.headers
                    )
                elif isinstance(event, h2.events.DataReceived):
                    outcome["data"] = outcome.get("data", b"") + event.data
                    connection.acknowledge_received_data(event.flow_controlled_length, stream)
                elif isinstance(event, h2.events.StreamEnded):
                    outcome["ended"] = "ended"
                elif isinstance(event, h2.events.StreamReset):
                    outcome["ended"] = f"reset {event.error_code!r}"
                elif isinstance(event, h2.events.ConnectionTerminated):
                    outcome["ended"] = f"goaway {event.error_code!r}"
            sock.sendall(connection.data_to_send())
    return outcome


#: Metadata no grpc client would send, by what is wrong with it.
MALFORMED = {
    "latin1": [(b"x-uid", b"\xc3\xa9l\xe8ve\xff")],  # not ASCII, not UTF-8
    "crlf": [(b"x-trace-id", b"abc\r\nx-uid: admin")],  # a header smuggled in a value
    "nul": [(b"x-uid", b"ad\x00min")],
    "uppercase": [(b"X-UID", b"admin")],  # which HTTP/2 forbids
    "bad-name": [(b"x uid", b"admin"), (b"x-uid:", b"admin")],
    "repeated": [(b"x-uid", b"admin"), (b"x-uid", b"root"), (b"x-user-ip", b"1.1.1.1, 2.2.2.2")],
    "oversized": [(b"x-trace-id", b"a" * 12 * 1024) for _ in range(12)],  # 144 KiB
    "grpc-own": [(b"grpc-timeout", b"-5S"), (b"grpc-encoding", b"nonesuch")],
}


def test_malformed_metadata_on_the_wire_never_crashes_or_decides_identity(spawn: Any) -> None:
    port = free_port()
    process = spawn(APP, GRPC_PORT=str(port))  # loopback is not a trusted peer here
    for case, metadata in MALFORMED.items():
        outcome = _raw_call(port, metadata)
        # Answered with a status, or the stream refused by the HTTP/2 layer: never a hang.
        assert outcome["ended"] is not None, case
        if outcome["headers"].get("grpc-status") == "0":
            seen = pb.Seen.FromString(outcome["data"][5:])
            assert seen.uid == "", case  # an untrusted peer's metadata never decides identity
            assert seen.user_ip == "127.0.0.1", case
        # The server is still there and still answers.
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pbg.ProbeStub(channel)
            assert stub.Echo(pb.Blob(data=b"still here"), timeout=10).data == b"still here", case
    lines = process.lines()
    assert not [line for line in lines if line.get("level") in ("error", "critical")], lines
    assert not [line for line in lines if "exception" in line], lines  # no traceback
    assert "admin" not in str([line for line in lines if line.get("log") != "access"])


def test_health_and_reflection_are_served(probe: Probe) -> None:
    health = health_pb2_grpc.HealthStub(probe.channel)
    for name in ("", "probe.v1.Probe"):
        answer = health.Check(health_pb2.HealthCheckRequest(service=name))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(probe.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (answer,) = list(reflection.ServerReflectionInfo(iter([request])))
    names = {service.name for service in answer.list_services_response.service}
    assert {"probe.v1.Probe", "grpc.health.v1.Health"} <= names
    # Public (no credentials asked), but on kiban's request path all the same: an access
    # line for each call, in the fixed schema.
    time.sleep(0.3)
    paths = [line["path"] for line in probe.process.lines() if line.get("log") == "access"]
    assert paths.count("/grpc.health.v1.Health/Check") == 2
    assert "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo" in paths


def test_streams_are_served_and_measured(probe: Probe) -> None:
    seen = list(probe.stub.Count(pb.Nap(seconds=0.001, count=5)))
    assert [s.count for s in seen] == [0, 1, 2, 3, 4]
    assert len({s.trace_id for s in seen}) == 1
    total = probe.stub.Sum(iter([pb.Blob(data=b"abc")] * 7))
    assert total.count == 7
    time.sleep(0.3)
    (sum_line,) = probe.access("Sum")
    assert sum_line["request_bytes"] == 7 * 5
    assert sum_line["grpc_status"] == "OK"


def test_a_client_that_stops_reading_a_stream_does_not_hold_the_server(probe: Probe) -> None:
    stream = probe.stub.Count(pb.Nap(seconds=0.01, count=100_000))
    next(stream)
    stream.cancel()
    time.sleep(0.5)
    (line,) = probe.access("Count")
    assert line["grpc_status"] == "CANCELLED"
    assert probe.stub.Echo(pb.Blob(data=b"x")).data == b"x"


def test_the_channel_propagates_context_and_the_deadline(spawn: Any) -> None:
    port = free_port()
    process = spawn(
        APP,
        GRPC_PORT=str(port),
        TRUSTED_PROXIES="127.0.0.1",
        PROBE_RELAY_TOKEN=token("jwt", "relay", "probe:read"),
    )
    probe = Probe(process, port)
    seen = probe.stub.Relay(pb.Empty(), metadata=[("x-trace-id", TRACE)], timeout=2)
    assert seen.trace_id == TRACE  # carried by kiban's channel to the next call
    assert seen.uid == "relay"  # the downstream's own verified caller
    # What was left of the caller's 2 s, not the channel's own 5 s (grpc rounds the
    # timeout it sends up by a few milliseconds).
    assert 0 < seen.deadline_s <= 2.05
    time.sleep(0.3)
    (outer,) = probe.access("Relay")
    (inner,) = probe.access("Whoami")
    assert outer["trace_id"] == inner["trace_id"] == TRACE


def test_a_method_without_security_stops_the_start(spawn: Any) -> None:
    port = free_port()
    process = spawn(APP, wait=False, GRPC_PORT=str(port), PROBE_NO_DEFAULT="1")
    assert process.popen.wait(timeout=30) != 0
    output = process.output.read_text()
    assert "no security requirement for the gRPC methods /probe.v1.Probe/Whoami" in output


def test_a_grpc_port_in_use_stops_the_start_before_any_migration(spawn: Any, tmp_path: Any) -> None:
    """As the HTTP port: taken before the start-up hooks. It was taken after them, so a
    replica whose gRPC port was in use ran its migrations first, then failed."""
    import socket

    database = tmp_path / "members.db"
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        process = spawn(
            APP,
            wait=False,
            GRPC_PORT=str(port),
            MIGRATE_ON_START="1",
            DATABASE_URL=f"sqlite+aiosqlite:///{database}",
        )
        assert process.popen.wait(timeout=30) == 3
    [failed] = [line for line in process.lines() if line.get("msg") == "start-up failed"]
    assert f"127.0.0.1:{port}" in failed["error"]
    assert not database.exists()  # no migration ran


def test_sigterm_turns_health_not_serving_and_in_flight_calls_finish(spawn: Any) -> None:
    port = free_port()
    process = spawn(APP, GRPC_PORT=str(port), HTTP_DRAIN_SECONDS="1")
    probe = Probe(process, port)
    health = health_pb2_grpc.HealthStub(probe.channel)
    results: list[Any] = []
    slow = threading.Thread(
        target=lambda: results.append(probe.stub.Sleep(pb.Nap(seconds=1.5), timeout=10))
    )
    slow.start()
    time.sleep(0.2)
    process.popen.send_signal(signal.SIGTERM)
    time.sleep(0.4)
    answer = health.Check(health_pb2.HealthCheckRequest(service="probe.v1.Probe"))
    assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING  # during the drain
    slow.join(timeout=10)
    assert results
    assert results[0].trace_id
    assert process.popen.wait(timeout=30) == 0


@given(
    st.lists(
        st.tuples(
            st.text(min_size=1, max_size=20),
            st.one_of(st.text(max_size=50), st.binary(max_size=50)),
        ),
        max_size=10,
    )
)
def test_metadata_becomes_latin1_headers_whatever_it_holds(
    metadata: list[tuple[str, str | bytes]],
) -> None:
    for name, value in _metadata_headers(metadata):
        assert name == name.lower()
        name.decode("latin-1")
        value.decode("latin-1")


@pytest.mark.parametrize(
    ("peer", "ip"),
    [
        ("ipv4:10.0.0.1:5000", "10.0.0.1"),
        ("ipv6:[::1]:5000", "::1"),
        ("ipv6:[fe80::1%eth0]:80", "fe80::1"),
        ("unix:/tmp/socket", None),
        ("", None),
    ],
)
def test_the_peer_ip_is_read_from_grpc_peer_strings(peer: str, ip: str | None) -> None:
    assert peer_ip(peer) == ip


@given(st.text(max_size=60))
def test_any_peer_string_is_read_without_error(peer: str) -> None:
    peer_ip(peer)


def test_kiban_check_audits_the_grpc_side(probe: Probe) -> None:
    import json
    import subprocess
    import sys

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "kiban",
            "check",
            probe.process.url,
            "--grpc",
            f"127.0.0.1:{probe.port}",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    rows = {row["detail"].split(" ")[0]: row for row in json.loads(done.stdout)["checks"]}
    assert rows["grpc.health.v1"]["ok"]
    assert rows["services:"]["ok"]
    assert "probe.v1.Probe" in rows["services:"]["detail"]
    whoami = rows["/probe.v1.Probe/Whoami"]
    assert whoami["ok"]
    assert "UNAUTHENTICATED" in whoami["detail"]
    assert rows["/probe.v1.Probe/Echo"]["ok"]
    crash = rows["/probe.v1.Probe/Crash"]  # a public method with a bug: found
    assert not crash["ok"]
    assert "INTERNAL" in crash["detail"]
    assert done.returncode == 1


def test_payloads_and_per_call_debug_logs_as_for_http(spawn: Any) -> None:
    port = free_port()
    process = spawn(
        APP,
        GRPC_PORT=str(port),
        PROBE_PAYLOADS="1",
        DEBUG_ENDPOINTS="true",
        TRUSTED_PROXIES="127.0.0.1",
    )
    probe = Probe(process, port)
    assert probe.stub.Echo(pb.Blob(data=b"hi")).data == b"hi"
    probe.stub.Limited(pb.Empty())
    probe.stub.Limited(pb.Empty(), metadata=[("x-debug", "1")])
    time.sleep(0.3)
    lines = process.lines()
    payloads = [line for line in lines if line.get("msg") == "payload"]
    (payload,) = [line for line in payloads if line["path"] == "/probe.v1.Probe/Echo"]
    assert payload["request_body"] == {"data": "aGk="}
    assert payload["response_body"] == {"data": "aGk="}
    debug = [line for line in lines if line.get("msg") == "limited called"]
    assert len(debug) == 1  # only the call that asked for it


def test_a_deadline_exceeded_upstream_cancels_the_downstream_call(probe: Probe) -> None:
    began = time.monotonic()
    with pytest.raises(grpc.RpcError) as late:
        probe.stub.RelaySleep(pb.Nap(seconds=5), timeout=0.5)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
    time.sleep(0.5)
    (downstream,) = probe.access("Sleep")
    # The downstream call got what was left of 0.5 s, and ended then, not after 5 s.
    assert downstream["grpc_status"] in ("DEADLINE_EXCEEDED", "CANCELLED")
    assert downstream["latency_s"] < 1
    assert time.monotonic() - began < 2


async def test_the_channel_stops_calling_a_failing_target_and_resumes_when_it_recovers() -> None:
    from kiban import _rpcclient
    from kiban._client import Breaker
    from kiban._config import Settings

    class Flaky(pbg.ProbeServicer):
        failing = True
        served = 0

        async def Echo(self, request: pb.Blob, context: Any) -> pb.Blob:
            self.served += 1
            if self.failing:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "down")
            return request

    class Clock:
        now = 1000.0

        def __call__(self) -> float:
            return self.now

    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    flaky, clock = Flaky(), Clock()
    server = grpc.aio.server()
    pbg.add_ProbeServicer_to_server(flaky, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = _rpcclient.channel(
        Settings(),
        f"127.0.0.1:{port}",
        tracer=provider.get_tracer("test"),
        breaker=Breaker(clock=clock, chance=lambda: 0.5),
    )
    stub = pbg.ProbeStub(channel)  # type: ignore[no-untyped-call]

    async def calls(count: int) -> tuple[int, int, int]:
        outcomes = []
        for _ in range(count):
            try:
                await stub.Echo(pb.Blob(data=b"x"), timeout=5)
                outcomes.append("answered")
            except grpc.aio.AioRpcError as error:
                local = "not made" in (error.details() or "")
                outcomes.append(f"{error.code().name} {'refused' if local else 'failed'}")
        assert set(outcomes) <= {"answered", "UNAVAILABLE refused", "UNAVAILABLE failed"}
        return tuple(  # type: ignore[return-value]
            outcomes.count(kind)
            for kind in ("answered", "UNAVAILABLE refused", "UNAVAILABLE failed")
        )

    try:
        answered, refused, failed = await calls(100)
        # Down: most calls fail fast here; the target sees a fraction of them.
        assert answered == 0
        assert refused > 50
        assert flaky.served == failed < 50
        # Recovered, and the failures have left the window: every call goes through.
        flaky.failing = False
        clock.now += 11
        assert await calls(50) == (50, 0, 0)
        # A client span for each call made (none for a call not made), with its code.
        codes = [span.attributes["rpc.grpc.status_code"] for span in spans.get_finished_spans()]
        assert codes == [14] * failed + [0] * 50
    finally:
        await channel.close()
        await server.stop(None)


async def test_a_streamed_calls_client_span_ends_with_its_status() -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from kiban import _rpcclient
    from kiban._config import Settings

    class Counter(pbg.ProbeServicer):
        async def Count(self, request: pb.Nap, context: Any) -> Any:
            for number in range(request.count):
                yield pb.Seen(count=number)
            if request.seconds < 0:
                await context.abort(grpc.StatusCode.INTERNAL, "broke mid-stream")

    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    server = grpc.aio.server()
    pbg.add_ProbeServicer_to_server(Counter(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = _rpcclient.channel(Settings(), f"127.0.0.1:{port}", tracer=provider.get_tracer("t"))
    stub = pbg.ProbeStub(channel)  # type: ignore[no-untyped-call]
    try:
        assert [seen.count async for seen in stub.Count(pb.Nap(count=3), timeout=5)] == [0, 1, 2]
        with pytest.raises(grpc.aio.AioRpcError):
            async for _ in stub.Count(pb.Nap(count=1, seconds=-1), timeout=5):
                pass
        for _ in range(50):  # the span ends once the stream's status has been read
            if len(spans.get_finished_spans()) == 2:
                break
            await asyncio.sleep(0.01)
        codes = [span.attributes["rpc.grpc.status_code"] for span in spans.get_finished_spans()]
        assert codes == [0, 13]
    finally:
        await channel.close()
        await server.stop(None)
