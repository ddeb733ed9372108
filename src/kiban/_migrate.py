"""Alembic migrations run from code (at start-up or in a job) and from the alembic CLI.

Either way the upgrade holds a lock in the database, so replicas that start together
take turns instead of racing on the same tables.

A service's ``migrations/env.py`` is two lines::

    from kiban._migrate import run_env
    run_env(Base.metadata)
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import Connection, MetaData, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

__all__ = ["run_env", "upgrade"]


async def upgrade(
    engine: AsyncEngine,
    script_location: str | Path,
    revision: str = "head",
    *,
    connect_timeout: float | None = None,
) -> None:
    """Upgrade the database behind ``engine`` to ``revision``.

    With ``connect_timeout``, a database that does not give a connection within it
    fails the upgrade with a ``TimeoutError`` naming its address: a start-up waiting on
    an address that takes connections and never answers ends, and says so.
    """
    from alembic import command
    from alembic.config import Config

    if engine.url.get_backend_name() == "sqlite" and engine.url.database:
        Path(engine.url.database).parent.mkdir(parents=True, exist_ok=True)

    def run(connection: Connection) -> None:
        config = Config()
        config.set_main_option("script_location", str(script_location))
        config.attributes["connection"] = connection
        command.upgrade(config, revision)

    connection = engine.connect()
    try:
        async with asyncio.timeout(connect_timeout):
            await connection.start()
    except TimeoutError:
        where = f"{engine.url.host}:{engine.url.port}" if engine.url.host else engine.url.database
        raise TimeoutError(
            f"the database at {where} did not answer in {connect_timeout} s"
        ) from None
    try:
        async with connection.begin():
            await _locked(connection, run)
    finally:
        await connection.close()


#: Replicas that start together with MIGRATE_ON_START upgrade one at a time: the others
#: wait for the lock, then find the schema at head and do nothing. Without it they race
#: (measured: one of four failed on a duplicate table, on PostgreSQL and on MariaDB,
#: where DDL is not transactional and an interleaved upgrade can be left half done).
LOCK_NAME = "kiban-migrations"
#: How long a replica waits for another's upgrade before its start fails.
LOCK_TIMEOUT = 300
_PG_KEY = int.from_bytes(hashlib.sha256(LOCK_NAME.encode()).digest()[:8], "big", signed=True)


async def _locked(connection: AsyncConnection, run: Callable[[Connection], None]) -> None:
    """``run`` the migrations on ``connection`` holding the database's migration lock."""
    held = await _lock(connection)
    try:
        await connection.run_sync(run)
    finally:
        if held is not None:  # MariaDB's lock is the session's: given back here
            await connection.execute(text("SELECT RELEASE_LOCK(:name)"), {"name": held})


async def _lock(connection: AsyncConnection) -> str | None:
    """Take the database's migration lock; the MariaDB lock's name, to release it."""
    dialect = connection.dialect.name
    if dialect == "postgresql":  # held until the upgrade's transaction ends
        await connection.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}s'"))
        await connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_KEY})
        return None
    if dialect in ("mysql", "mariadb"):  # named per database: the server's locks are global
        name = f"{LOCK_NAME}:{connection.engine.url.database}"[:64]
        got = await connection.execute(
            text("SELECT GET_LOCK(:name, :timeout)"), {"name": name, "timeout": LOCK_TIMEOUT}
        )
        if got.scalar() != 1:
            raise TimeoutError(f"another process held {name!r} for {LOCK_TIMEOUT} s")
        return name
    return None  # SQLite: one file, its writers already queue


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
            await _locked(connection, run)
        await engine.dispose()

    url = os.environ.get("DATABASE_URL") or context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("set DATABASE_URL to run migrations from the command line")
    asyncio.run(from_url(url))
