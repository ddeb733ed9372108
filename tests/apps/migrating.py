"""A small kiban service that migrates its database at start-up (``DATABASE_URL``,
``MIGRATE_ON_START``): lighter to start than the members sample."""

from __future__ import annotations

from fastapi import FastAPI

import kiban
from kiban.security import NoSecurity
from tests.apps.migrations import HERE

app = FastAPI(title="migrating")
service = kiban.Service(app, security=NoSecurity())
service.database(migrations=HERE)
