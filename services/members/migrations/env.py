"""Alembic environment of the members service."""

from kiban.database import run_env
from services.members.models import Base

run_env(Base.metadata)
