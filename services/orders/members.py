"""The members service as orders sees it: over HTTP (the generated typed client) or gRPC.

Both carry the request context (trace id, uid, the user's identity token) through
kiban's client or channel; ``MEMBERS_GRPC`` (``host:port``) picks gRPC. Either way a
member that does not exist is a 404 and an outage a 503 the caller can answer with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import httpx

import kiban
from services.members.rpc import members_pb2, members_pb2_grpc
from services.orders.members_client import Client
from services.orders.members_client.api.members import get_member
from services.orders.members_client.models import MemberOut


@dataclass(frozen=True)
class Member:
    id: int
    name: str


class Members(Protocol):
    async def get(self, member_id: int) -> Member: ...


def _unavailable() -> kiban.Problem:
    return kiban.Problem(503, "The members service is unavailable.", headers={"retry-after": "1"})


class HTTPMembers:
    def __init__(self, http: httpx.AsyncClient, base_url: str) -> None:
        self.client = Client(base_url=base_url)
        # The kiban client: every call carries the request context to members.
        self.client.set_async_httpx_client(http)

    async def get(self, member_id: int) -> Member:
        """The member, or a problem the caller can answer with as is."""
        try:
            response = await get_member.asyncio_detailed(member_id, client=self.client)
        except ValueError:  # members answered with something that is not JSON
            raise kiban.Problem(503, "The members service answered badly.") from None
        if isinstance(response.parsed, MemberOut):
            return Member(response.parsed.id, response.parsed.name)
        if response.status_code == 404:
            raise kiban.Problem(404, f"No member has id {member_id}.")
        kiban.log.warning("members call failed", status=int(response.status_code))
        raise _unavailable()


class GRPCMembers:
    def __init__(self, channel: Any) -> None:
        # A kiban channel: every call carries the request context and deadline.
        self.stub = members_pb2_grpc.MembersStub(channel)

    async def get(self, member_id: int) -> Member:
        try:
            found = await self.stub.GetMember(members_pb2.GetMemberRequest(id=member_id))
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                raise kiban.Problem(404, f"No member has id {member_id}.") from None
            kiban.log.warning("members call failed", grpc_status=error.code().name)
            raise _unavailable() from None
        return Member(found.id, found.name)
