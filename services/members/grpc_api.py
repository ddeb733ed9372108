"""The members gRPC API: get and register, on the same repository as the HTTP routes.

Security is declared where the servicer is added (``create_app``), with the objects the
HTTP routes use; errors are raised as ``kiban.Problem`` and reach the caller as their
gRPC status (404 NOT_FOUND, 409 ALREADY_EXISTS, 400 INVALID_ARGUMENT).
"""

from __future__ import annotations

from datetime import UTC
from typing import Any

from pydantic import ValidationError

import kiban
from kiban.database import Database
from kiban.security import owns
from services.members.models import Member
from services.members.repository import EmailTaken, MemberRepository
from services.members.rpc import members_pb2, members_pb2_grpc
from services.members.schemas import MemberIn


def _message(member: Member) -> members_pb2.Member:
    return members_pb2.Member(
        id=member.id,
        email=member.email,
        name=member.name,
        created_at=(
            member.created_at.astimezone(UTC)
            if member.created_at.tzinfo
            else member.created_at.replace(tzinfo=UTC)  # SQLite keeps no offset: stored UTC
        )
        .isoformat()
        .replace("+00:00", "Z"),
    )


class MembersServicer(members_pb2_grpc.MembersServicer):
    def __init__(self, database: Database) -> None:
        self.database = database

    async def GetMember(
        self, request: members_pb2.GetMemberRequest, context: Any
    ) -> members_pb2.Member:
        """Any member for a caller holding ``members:read``; a member, only themselves."""
        member = None
        if 1 <= request.id <= 2**31 - 1 and owns(request.id, or_scope="members:read"):
            async with self.database.reading() as session:
                member = await MemberRepository(session).get(request.id)
        if member is None:
            raise kiban.Problem(404, f"No member has id {request.id}.")
        return _message(member)

    async def Register(
        self, request: members_pb2.RegisterRequest, context: Any
    ) -> members_pb2.Member:
        try:
            body = MemberIn(email=request.email, name=request.name)
        except ValidationError as exc:
            fields = sorted({str(error["loc"][0]) for error in exc.errors()})
            raise kiban.Problem(
                400, f"Invalid {', '.join(fields)}.", fields=",".join(fields)
            ) from None
        try:
            async with self.database.transaction() as session:
                member = await MemberRepository(session).add(str(body.email), body.name)
        except EmailTaken:
            raise kiban.Problem(409, "A member with this email is already registered.") from None
        kiban.log.info("member registered", member_id=member.id, via="grpc")
        return _message(member)
