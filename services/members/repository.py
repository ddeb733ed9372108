"""Members storage: the only module that speaks SQL."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from services.members.models import Member


class EmailTaken(Exception):
    """Another member already registered this email."""


class MemberRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, email: str, name: str) -> Member:
        member = Member(email=email.lower(), name=name)
        self.session.add(member)
        await self._flush()
        await self.session.refresh(member)
        return member

    async def get(self, member_id: int) -> Member | None:
        return await self.session.get(Member, member_id)

    async def update(self, member: Member, email: str | None, name: str | None) -> Member:
        if email is not None:
            member.email = email.lower()
        if name is not None:
            member.name = name
        await self._flush()
        await self.session.refresh(member)
        return member

    async def page(self, limit: int, offset: int) -> tuple[Sequence[Member], int]:
        total = await self.session.scalar(select(func.count()).select_from(Member))
        rows = await self.session.scalars(
            select(Member).order_by(Member.id).limit(limit).offset(offset)
        )
        return rows.all(), total or 0

    async def _flush(self) -> None:
        try:
            await self.session.flush()
        except IntegrityError as exc:
            await self.session.rollback()
            raise EmailTaken from exc
