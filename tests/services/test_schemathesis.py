"""schemathesis against the running sample services: every check, positive and negative."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import token

pytestmark = pytest.mark.process

CONFIG = """
[auth.openapi.jwt]
bearer = "${KIBAN_TEST_ADMIN}"

[auth.openapi.api_key]
api_key = "dev-partner-key"

[auth.openapi.internal_id_token]
api_key = "${KIBAN_TEST_USER}"
"""


def schemathesis(url: str, tmp_path: Path, examples: int = 40) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    env = {
        **os.environ,
        "KIBAN_TEST_ADMIN": token("jwt", "ops", "members:admin", "members:read"),
        "KIBAN_TEST_USER": token("internal", "1"),
    }
    return subprocess.run(
        [
            str(Path(sys.executable).parent / "schemathesis"),
            "--config-file",
            str(config),
            "run",
            f"{url}/openapi.json",
            "--checks",
            "all",
            "--max-examples",
            str(examples),
            "--seed",
            "1234",
            "--request-timeout",
            "10",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=tmp_path,
    )


@pytest.fixture
def members(spawn: Any, tmp_path: Path) -> Any:
    return spawn(
        "services.members.app:create_app",
        RATE_LIMIT="100000/second",
        DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/members.db",
    )


def _no_failures(result: subprocess.CompletedProcess[str], service: Any) -> None:
    summary = result.stdout[-3000:]
    assert result.returncode == 0, summary
    assert " passed" in summary
    server_errors = [
        line for line in service.lines() if line.get("log") == "access" and line["status"] >= 500
    ]
    assert server_errors == []


def test_members_api_has_no_server_errors_and_no_schema_violations(
    members: Any, tmp_path: Path
) -> None:
    _no_failures(schemathesis(members.url, tmp_path), members)


def test_orders_api_has_no_server_errors_and_no_schema_violations(
    members: Any, spawn: Any, tmp_path: Path
) -> None:
    orders = spawn(
        "services.orders.app:create_app",
        RATE_LIMIT="100000/second",
        MEMBERS_URL=members.url,
        DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/orders.db",
    )
    _no_failures(schemathesis(orders.url, tmp_path), orders)
