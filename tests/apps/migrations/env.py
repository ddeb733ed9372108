"""Alembic environment of the slow test migration."""

from sqlalchemy import MetaData

from kiban.database import run_env

run_env(MetaData())
