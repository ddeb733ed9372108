"""The members service: a kiban service with a real database.

Run it with ``kiban run services.members.app:create_app``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

import kiban
from kiban import RateLimit
from kiban.security import Security
from services.common import SampleSettings, Schemes
from services.members.migrations import migrate
from services.members.routes import router


class MembersSettings(SampleSettings):
    service_name: str = "members"
    http_port: int = 8001
    database_url: str = "sqlite+aiosqlite:///./.run/members.db"
    #: Apply the alembic migrations at start-up (handy in development; run them as a job in prod).
    migrate_on_start: bool = True
    #: Registrations per second from one user IP.
    registration_rate_limit: str = "30/second"


def create_app(settings: MembersSettings | None = None) -> FastAPI:
    settings = settings or kiban.load(MembersSettings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.migrate_on_start:
            await migrate(database.engine)
        yield

    app = FastAPI(
        title="members",
        version=settings.service_version,
        lifespan=lifespan,
        generate_unique_id_function=lambda route: route.name,  # client names: get_member, ...
    )
    schemes = Schemes(settings)
    service = kiban.Service(
        app,
        settings,
        security=Security(schemes.jwt, scopes=["members:admin"]),
        rate_limit=RateLimit(settings.rate_limit),
    )
    database = service.database()
    app.include_router(router(schemes, settings.registration_rate_limit))
    return app
