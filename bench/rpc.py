"""The gRPC row of ``make bench``: a unary call on bare ``grpc.aio`` and in kiban's chassis.

``python -m bench.rpc serve VARIANT PORT`` serves ``probe.v1.Probe/Echo`` (the test
suite's probe service) on bare ``grpc.aio`` or through ``kiban.run`` with its gRPC
chassis (context, access line to a file, span, metrics, security declared public, rate
limit); ``python -m bench.rpc drive PORT SECONDS CONCURRENCY`` calls it from a
``grpc.aio`` client with that many calls in flight and prints calls/s and p99 ms.

A Python client costs about as much per call as the server, so the served rate can be
the client's; the server's CPU time per call (read from /proc by ``bench.run``) is the
figure the ratio is taken from.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

import grpc

from tests.apps.rpc import probe_pb2 as pb
from tests.apps.rpc import probe_pb2_grpc as pbg


class Echo(pbg.ProbeServicer):
    async def Echo(self, request: pb.Blob, context: Any) -> pb.Blob:
        return pb.Blob(data=request.data)


async def _bare(port: int) -> None:
    server = grpc.aio.server()
    pbg.add_ProbeServicer_to_server(Echo(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def _kiban(port: int) -> int:
    from fastapi import FastAPI

    import kiban
    from kiban import RateLimit
    from kiban.security import NoSecurity

    app = FastAPI()
    settings = kiban.Settings(
        service_name="bench-grpc",
        grpc_port=port,
        http_port=0,
        log_level="warning",
    )
    service = kiban.Service(
        app, settings, security=NoSecurity(), rate_limit=RateLimit("100000000/second")
    )
    service.grpc.add(pbg.add_ProbeServicer_to_server, Echo())
    return kiban.run(service)


async def _drive(port: int, seconds: float, concurrency: int) -> None:
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pbg.ProbeStub(channel)
        request = pb.Blob(data=b"ping")
        for _ in range(200):
            await stub.Echo(request)
        end = time.monotonic() + seconds

        async def caller() -> None:
            while time.monotonic() < end:
                began = time.perf_counter()
                await stub.Echo(request)
                latencies.append(time.perf_counter() - began)

        started = time.monotonic()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        elapsed = time.monotonic() - started
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99)] * 1000
    print(f"{len(latencies) / elapsed:.1f} {p99:.3f} {len(latencies)}")


def main() -> int:
    command, variant_or_port = sys.argv[1], sys.argv[2]
    if command == "serve":
        port = int(sys.argv[3])
        if variant_or_port == "grpc":
            asyncio.run(_bare(port))
            return 0
        os.environ.setdefault("LOG_FORMAT", "json")
        return _kiban(port)
    asyncio.run(_drive(int(variant_or_port), float(sys.argv[3]), int(sys.argv[4])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
