"""Alembic migrations: ``service.database(migrations=HERE)``."""

from pathlib import Path

HERE = Path(__file__).parent
