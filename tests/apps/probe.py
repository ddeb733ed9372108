"""A kiban service serving ``probe.v1.Probe`` over gRPC, for tests/test_rpc.py.

API default: a JWT (the sample system's dev keys) with ``probe:read``; ``Limited`` and
``Sleep`` are public, ``Limited`` rate limited per IP. ``PROBE_NO_DEFAULT=1`` drops the
API default, leaving ``Whoami`` without a requirement: the start must fail.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI

import kiban
from kiban import RateLimit
from kiban._rpcclient import DEADLINE
from kiban.security import JWT, NoSecurity, RateLimited, Security
from services.common import DEV_KEYS
from tests.apps.rpc import probe_pb2 as pb
from tests.apps.rpc import probe_pb2_grpc as pbg


def _seen(count: int = 0) -> pb.Seen:
    context = kiban.current()
    deadline = DEADLINE.get()
    return pb.Seen(
        trace_id=context.trace_id if context else "",
        uid=(context.uid or "") if context else "",
        user_ip=(context.user_ip or "") if context else "",
        request_id=context.request_id if context else "",
        count=count,
        deadline_s=deadline - time.monotonic() if deadline is not None else -1,
    )


class Probe(pbg.ProbeServicer):
    def __init__(self, service: kiban.Service) -> None:
        self.service = service
        self.channel: Any = None

    async def Whoami(self, request: pb.Empty, context: Any) -> pb.Seen:
        return _seen()

    async def Relay(self, request: pb.Empty, context: Any) -> pb.Seen:
        if self.channel is None:
            port = os.environ["GRPC_PORT"]
            self.channel = self.service.grpc_channel(f"127.0.0.1:{port}")
        stub = pbg.ProbeStub(self.channel)
        token = os.environ.get("PROBE_RELAY_TOKEN", "")
        metadata = [("authorization", f"Bearer {token}")] if token else None
        seen: pb.Seen = await stub.Whoami(pb.Empty(), metadata=metadata)
        return seen

    async def RelaySleep(self, request: pb.Nap, context: Any) -> pb.Seen:
        if self.channel is None:
            self.channel = self.service.grpc_channel(f"127.0.0.1:{os.environ['GRPC_PORT']}")
        seen: pb.Seen = await pbg.ProbeStub(self.channel).Sleep(request)
        return seen

    async def Sleep(self, request: pb.Nap, context: Any) -> pb.Seen:
        seen = _seen()
        await asyncio.sleep(request.seconds)
        return seen

    async def Crash(self, request: pb.Empty, context: Any) -> pb.Seen:
        raise RuntimeError("internal detail: pool 7 of db-3 exhausted")

    def Limited(self, request: pb.Empty, context: Any) -> pb.Seen:
        """A synchronous method: run on a thread, with the call's context."""
        kiban.log.debug("limited called")  # written only for a call asking for debug
        return _seen()

    async def Echo(self, request: pb.Blob, context: Any) -> pb.Blob:
        return pb.Blob(data=request.data)

    async def Count(self, request: pb.Nap, context: Any) -> AsyncIterator[pb.Seen]:
        for number in range(request.count):
            yield _seen(number)
            await asyncio.sleep(request.seconds)

    async def Sum(self, requests: AsyncIterator[pb.Blob], context: Any) -> pb.Seen:
        count = 0
        async for _ in requests:
            count += 1
        return _seen(count)


def create_app() -> FastAPI:
    app = FastAPI(title="probe")
    jwt = JWT(
        algorithms=["EdDSA"],
        key=(DEV_KEYS / "auth-dev.pub.pem").read_bytes(),
        issuer="kiban-dev-auth",
    )
    default = None if os.environ.get("PROBE_NO_DEFAULT") else Security(jwt, scopes=["probe:read"])
    service = kiban.Service(
        app,
        security=default,
        rate_limit=RateLimit("1000/second"),
        debug_security=Security(jwt, scopes=["debug"]),
    )
    service.payloads.enabled = bool(os.environ.get("PROBE_PAYLOADS"))
    if service.settings.migrate_on_start:  # a database migrated at start-up (DATABASE_URL)
        from tests.apps.migrations import HERE

        service.database(migrations=HERE)
    service.grpc.add(
        pbg.add_ProbeServicer_to_server,
        Probe(service),
        security=None if default is None else [Security(jwt, scopes=["probe:read"])],
        methods={
            "Sleep": NoSecurity(),
            "Crash": NoSecurity(),
            "Echo": NoSecurity(),
            "Count": NoSecurity(),
            "Sum": NoSecurity(),
            "Relay": NoSecurity(),
            "RelaySleep": NoSecurity(),
            "Limited": [NoSecurity(), RateLimited("2/minute", key="ip")],
        },
    )

    @app.get("/hello", dependencies=[NoSecurity()])
    async def hello() -> dict[str, str]:
        return {"hello": "probe"}

    return app
