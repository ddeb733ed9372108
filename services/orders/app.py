"""The orders service: places orders for members, checking each member with the members
service through kiban's propagating client.

Run it with ``kiban run services.orders.app:create_app``.
"""

from __future__ import annotations

from fastapi import FastAPI

import kiban
from kiban import RateLimit
from kiban.security import Security
from services.common import SampleSettings, Schemes
from services.orders.members import GRPCMembers, HTTPMembers, Members
from services.orders.migrations import HERE as MIGRATIONS
from services.orders.routes import router


class OrdersSettings(SampleSettings):
    service_name: str = "orders"
    http_port: int = 8002
    database_url: str = "sqlite+aiosqlite:///./.run/orders.db"
    members_url: str = "http://127.0.0.1:8001"
    #: ``host:port`` of members' gRPC server: orders then calls members over gRPC.
    members_grpc: str | None = None
    migrate_on_start: bool = True


def create_app(settings: OrdersSettings | None = None) -> FastAPI:
    settings = settings or kiban.load(OrdersSettings)

    app = FastAPI(
        title="orders",
        version=settings.service_version,
        generate_unique_id_function=lambda route: route.name,
    )
    schemes = Schemes(settings)
    # Every orders route acts for a user: the gateway's identity token is required.
    service = kiban.Service(
        app,
        settings,
        security=Security(schemes.internal),
        rate_limit=RateLimit(settings.rate_limit),
    )
    service.database(migrations=MIGRATIONS)
    members: Members = (
        GRPCMembers(service.grpc_channel(settings.members_grpc))
        if settings.members_grpc
        else HTTPMembers(service.http_client(settings.members_url), settings.members_url)
    )
    app.state.members = members
    # Reported, not critical: a members outage must not take every orders pod out of rotation.
    service.add_pinger(
        kiban.HTTPPinger(
            f"{settings.members_url}/health/readiness",
            "members",
            client=service.http_client(retries=0),
        ),
        critical=False,
    )
    app.include_router(router)
    return app
