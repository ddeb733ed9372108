"""The members HTTP API.

Security, narrowest first: registration is public; listing takes an API key; "my
profile" takes the gateway's identity token; reading one member takes a JWT with
``members:read`` or an identity token (so orders can check a member on a user's behalf);
everything else falls back to the API default, an admin JWT (``members:admin``).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query

import kiban
from kiban.database import ReadSession, Session
from kiban.security import NoSecurity, RateLimited, Security, owns, principal
from services.common import Schemes
from services.members.repository import EmailTaken, MemberRepository
from services.members.schemas import MemberIn, MemberOut, MemberPage, MemberPatch


async def repository(session: Session) -> MemberRepository:
    """The repository in the request's transaction, committed before the response starts.

    ``async`` though it awaits nothing: FastAPI runs a plain ``def`` dependency on a
    worker thread, a thread hop on every request for a constructor call.
    """
    return MemberRepository(session)


async def reading_repository(session: ReadSession) -> MemberRepository:
    """The repository for a handler that only reads: it cannot write, and a one-query
    read is one round trip on PostgreSQL (no transaction around it)."""
    return MemberRepository(session)


Repo = Annotated[MemberRepository, Depends(repository)]
#: For one-query reads; a read that needs one snapshot over several queries (a page
#: and its total) takes ``Repo``.
ReadRepo = Annotated[MemberRepository, Depends(reading_repository)]
#: Ids are 32-bit in every supported database; larger ones are a 422, not a driver error.
MemberId = Annotated[int, Path(ge=1, le=2**31 - 1)]


def _not_found(member_id: int) -> kiban.Problem:
    return kiban.Problem(404, f"No member has id {member_id}.")


def _email_taken() -> kiban.Problem:
    return kiban.Problem(409, "A member with this email is already registered.")


def router(schemes: Schemes, registration_limit: str = "30/second") -> APIRouter:
    routes = APIRouter(prefix="/members", tags=["members"])

    @routes.post(
        "",
        status_code=201,
        response_model=MemberOut,
        dependencies=[NoSecurity(), RateLimited(registration_limit, key="ip")],
    )
    async def register(body: MemberIn, repo: Repo) -> MemberOut:
        try:
            member = await repo.add(str(body.email), body.name)
        except EmailTaken:
            raise _email_taken() from None
        kiban.log.info("member registered", member_id=member.id)
        return MemberOut.model_validate(member)

    @routes.get("/me", response_model=MemberOut, dependencies=[Security(schemes.internal)])
    async def my_profile(repo: ReadRepo) -> MemberOut:
        who = principal()
        assert who is not None
        member = await repo.get(int(who.subject)) if who.subject.isdigit() else None
        if member is None:
            raise kiban.Problem(404, "Your profile does not exist.")
        return MemberOut.model_validate(member)

    @routes.get(
        "/{member_id:int}",
        response_model=MemberOut,
        dependencies=[Security(schemes.jwt.requiring("members:read"), schemes.internal)],
    )
    async def get_member(member_id: MemberId, repo: ReadRepo) -> MemberOut:
        """Any member for a service holding ``members:read``; a member, only themselves."""
        member = await repo.get(member_id) if owns(member_id, or_scope="members:read") else None
        if member is None:
            raise _not_found(member_id)
        return MemberOut.model_validate(member)

    @routes.patch("/{member_id:int}", response_model=MemberOut)
    async def update_member(member_id: MemberId, body: MemberPatch, repo: Repo) -> MemberOut:
        member = await repo.get(member_id)
        if member is None:
            raise _not_found(member_id)
        try:
            member = await repo.update(
                member, str(body.email) if body.email is not None else None, body.name
            )
        except EmailTaken:
            raise _email_taken() from None
        return MemberOut.model_validate(member)

    @routes.get("", response_model=MemberPage, dependencies=[Security(schemes.api_key)])
    async def list_members(
        repo: Repo,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
        offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    ) -> MemberPage:
        rows, total = await repo.page(limit, offset)
        return MemberPage(
            items=[MemberOut.model_validate(row) for row in rows],
            total=total,
            limit=limit,
            offset=offset,
        )

    return routes
