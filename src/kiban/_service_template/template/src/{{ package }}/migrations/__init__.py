"""Alembic migrations."""

from pathlib import Path

from kiban.database import upgrade
from sqlalchemy.ext.asyncio import AsyncEngine


async def migrate(engine: AsyncEngine) -> None:
    await upgrade(engine, Path(__file__).parent)
