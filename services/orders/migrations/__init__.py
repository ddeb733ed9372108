"""Alembic migrations of the orders service."""

from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine

from kiban.database import upgrade

HERE = Path(__file__).parent


async def migrate(engine: AsyncEngine) -> None:
    await upgrade(engine, HERE)
