"""kiban.testing, used as a service author's suite uses it (``pytest_plugins``)."""

from __future__ import annotations

from typing import Any

import httpx
from fastapi import FastAPI, Request
from starlette.testclient import TestClient

import kiban
from kiban.security import Security
from kiban.testing import CapturedLogs, Keys, capture_spans, client, downstream

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
GATEWAY = ("10.0.0.3", 5000)


def _service(keys: Keys) -> tuple[FastAPI, kiban.Service]:
    app = FastAPI()
    service = kiban.Service(
        app,
        kiban.Settings(trusted_proxies=["10.0.0.0/8"]),  # the gateway
        security=Security(keys.jwt(), scopes=["orders:read"]),
    )
    members = service.http_client("http://members.internal")

    @app.get("/orders/{order_id}")
    async def order(order_id: int, request: Request) -> dict[str, Any]:
        kiban.log.info("looking up the member", order_id=order_id)
        member = (await members.get("/members/1")).json()
        return {"order": order_id, "member": member}

    return app, service


def test_tokens_from_throwaway_keys_pass_the_scheme_and_scopes_still_count(
    kiban_keys: Keys,
) -> None:
    app, service = _service(kiban_keys)
    downstream(service, lambda request: httpx.Response(200, json={"id": 1}))
    with TestClient(app, client=GATEWAY) as client:
        assert client.get("/orders/7", headers=kiban_keys.bearer("ada", "orders:read")).json() == {
            "order": 7,
            "member": {"id": 1},
        }
        assert client.get("/orders/7", headers=kiban_keys.bearer("ada")).status_code == 403
        assert client.get("/orders/7").status_code == 401
        other = Keys()  # someone else's keys: refused
        assert (
            client.get("/orders/7", headers=other.bearer("ada", "orders:read")).status_code == 401
        )


def test_a_mocked_downstream_still_gets_kibans_propagation_and_client_span(
    kiban_keys: Keys, kiban_logs: CapturedLogs
) -> None:
    app, service = _service(kiban_keys)
    seen: list[httpx.Request] = []

    def members(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"id": 1})

    downstream(service, members, base_url="http://members.internal")
    spans = capture_spans(service)
    with client(app, peer=GATEWAY) as started:
        response = started.get(
            "/orders/7", headers={**kiban_keys.bearer("ada", "orders:read"), "x-trace-id": TRACE}
        )
    assert response.status_code == 200
    (request,) = seen
    assert request.headers["x-trace-id"] == TRACE  # propagated, as to a real downstream
    assert request.headers["x-uid"] == "ada"
    assert "traceparent" in request.headers
    kinds = {span.kind.name for span in spans.get_finished_spans()}
    assert {"SERVER", "CLIENT"} <= kinds
    (line,) = [line for line in kiban_logs.access() if line["path"] == "/orders/7"]
    assert (line["trace_id"], line["uid"]) == (TRACE, "ada")
    assert "looking up the member" in kiban_logs.messages()


def test_grpc_channel_calls_the_started_apps_own_server_through_the_chassis(
    kiban_keys: Keys, kiban_logs: CapturedLogs
) -> None:
    import grpc
    import pytest

    from kiban.testing import grpc_channel
    from tests.apps.rpc import probe_pb2 as pb
    from tests.apps.rpc import probe_pb2_grpc as pbg

    class Probe(pbg.ProbeServicer):
        async def Whoami(self, request: pb.Empty, context: Any) -> pb.Seen:
            who = kiban.current()
            return pb.Seen(uid=(who.uid or "") if who else "")

    app = FastAPI()
    service = kiban.Service(
        app, kiban.Settings(grpc_port=0), security=Security(kiban_keys.jwt(), scopes=["p:read"])
    )
    service.grpc.add(pbg.add_ProbeServicer_to_server, Probe())
    with pytest.raises(RuntimeError, match="not running"), grpc_channel(app):
        pass  # not started yet
    with client(app), grpc_channel(app) as channel:
        stub = pbg.ProbeStub(channel)
        token = kiban_keys.bearer("ada", "p:read")["authorization"]
        seen = stub.Whoami(pb.Empty(), metadata=[("authorization", token)], timeout=10)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Whoami(pb.Empty(), timeout=10)
    assert seen.uid == "ada"
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    statuses = [line["grpc_status"] for line in kiban_logs.access()]
    assert statuses == ["OK", "UNAUTHENTICATED"]
