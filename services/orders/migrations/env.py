"""Alembic environment of the orders service."""

from kiban.database import run_env
from services.orders.models import Base

run_env(Base.metadata)
