"""Alembic migrations run from code (at start-up or in a job) and from the alembic CLI.

A service's ``migrations/env.py`` is two lines::

    from kiban._migrate import run_env
    run_env(Base.metadata)
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from sqlalchemy import Connection, MetaData
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

__all__ = ["run_env", "upgrade"]


async def upgrade(engine: AsyncEngine, script_location: str | Path, revision: str = "head") -> None:
    """Upgrade the database behind ``engine`` to ``revision``."""
    from alembic import command
    from alembic.config import Config

    if engine.url.get_backend_name() == "sqlite" and engine.url.database:
        Path(engine.url.database).parent.mkdir(parents=True, exist_ok=True)

    def run(connection: Connection) -> None:
        config = Config()
        config.set_main_option("script_location", str(script_location))
        config.attributes["connection"] = connection
        command.upgrade(config, revision)

    async with engine.begin() as connection:
        await connection.run_sync(run)


def run_env(metadata: MetaData) -> None:
    """The body of an alembic ``env.py``: the connection handed over, else ``DATABASE_URL``."""
    from alembic import context

    def run(connection: Connection) -> None:
        context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()

    given = context.config.attributes.get("connection")
    if given is not None:
        run(given)
        return

    async def from_url(url: str) -> None:
        engine = create_async_engine(url)
        async with engine.begin() as connection:
            await connection.run_sync(run)
        await engine.dispose()

    url = os.environ.get("DATABASE_URL") or context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("set DATABASE_URL to run migrations from the command line")
    asyncio.run(from_url(url))
