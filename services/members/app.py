"""The members service: a kiban service with a real database.

Run it with ``kiban run services.members.app:create_app``.
"""

from __future__ import annotations

from fastapi import FastAPI

import kiban
from kiban import RateLimit
from kiban.security import NoSecurity, RateLimited, Security
from services.common import SampleSettings, Schemes
from services.members.grpc_api import MembersServicer
from services.members.migrations import HERE as MIGRATIONS
from services.members.routes import router
from services.members.rpc import members_pb2_grpc


class MembersSettings(SampleSettings):
    service_name: str = "members"
    http_port: int = 8001
    grpc_port: int = 9001
    database_url: str = "sqlite+aiosqlite:///./.run/members.db"
    #: Apply the alembic migrations at start-up (handy in development; run them as a job in prod).
    migrate_on_start: bool = True
    #: Registrations per second from one user IP.
    registration_rate_limit: str = "30/second"


def create_app(settings: MembersSettings | None = None) -> FastAPI:
    settings = settings or kiban.load(MembersSettings)

    app = FastAPI(
        title="members",
        version=settings.service_version,
        generate_unique_id_function=lambda route: route.name,  # client names: get_member, ...
    )
    schemes = Schemes(settings)
    service = kiban.Service(
        app,
        settings,
        security=Security(schemes.jwt, scopes=["members:admin"]),
        rate_limit=RateLimit(settings.rate_limit),
    )
    database = service.database(migrations=MIGRATIONS)
    app.include_router(router(schemes, settings.registration_rate_limit))
    # The same domain over gRPC, on GRPC_PORT, under the same declarations.
    service.grpc.add(
        members_pb2_grpc.add_MembersServicer_to_server,
        MembersServicer(database),
        methods={
            "GetMember": Security(schemes.jwt.requiring("members:read"), schemes.internal),
            "Register": [
                NoSecurity(),
                RateLimited(settings.registration_rate_limit, key="ip"),
            ],
        },
    )
    return app
