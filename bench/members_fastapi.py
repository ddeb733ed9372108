"""The members GET-by-id on bare FastAPI: the database path ``make bench`` compares without kiban.

The sample's model and response schema, SQLite through SQLAlchemy's async engine, a
session per request as FastAPI's documentation shows it; no chassis. (Annotations are
not postponed here: FastAPI resolves them against this module's names.)
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from services.members.models import Base, Member
from services.members.schemas import MemberOut


def create_app(database_url: str) -> FastAPI:
    engine = create_async_engine(database_url)
    sessions = async_sessionmaker(engine, expire_on_commit=False)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with engine.begin() as connection:
            await connection.run_sync(Base.metadata.create_all)
        async with sessions.begin() as session:
            if await session.get(Member, 1) is None:
                session.add(Member(id=1, email="bench@example.com", name="Bench"))
        yield
        await engine.dispose()

    async def session() -> AsyncIterator[AsyncSession]:
        async with sessions() as opened:
            yield opened

    app = FastAPI(
        lifespan=lifespan,
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )

    @app.get("/members/{member_id}")
    async def get_member(
        member_id: int, db: Annotated[AsyncSession, Depends(session)]
    ) -> MemberOut:
        member = await db.get(Member, member_id)
        if member is None:
            raise HTTPException(404)
        return MemberOut.model_validate(member)

    return app
