"""Alembic migrations of the orders service: ``service.database(migrations=HERE)``."""

from pathlib import Path

HERE = Path(__file__).parent
