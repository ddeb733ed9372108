"""Configuration comes from the environment and fails loudly, naming every bad variable."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import SecretStr

from kiban._config import ConfigError, Settings, load
from tests.conftest import ROOT


def test_defaults_need_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A service starts on embedded defaults: SQLite, no Redis, info level."""
    for name in ("DATABASE_URL", "REDIS_URL", "LOG_LEVEL", "HTTP_PORT"):
        monkeypatch.delenv(name, raising=False)
    settings = load(Settings)
    assert settings.database_url.startswith("sqlite+aiosqlite://")
    assert settings.redis_url is None
    assert settings.log_level == "info"
    assert settings.http_keep_alive_timeout > 60  # above common load balancers' idle timeout


def test_environment_overrides_including_nested_header_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTP_PORT", "9000")
    monkeypatch.setenv("LOG_LEVEL", "DEBUG".lower())
    monkeypatch.setenv("HEADERS__UID", "x-user-id")
    settings = load(Settings)
    assert settings.http_port == 9000
    assert settings.log_level == "debug"
    assert settings.headers.uid == "x-user-id"
    assert settings.headers.trace_id == "x-trace-id"


def test_every_bad_variable_is_named_in_one_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PORT", "eighty")
    monkeypatch.setenv("LOG_LEVEL", "loud")
    monkeypatch.setenv("HTTP_DRAIN_SECONDS", "-1")
    monkeypatch.setenv("HEADERS__UID", "")  # valid: an empty string is a string
    with pytest.raises(ConfigError) as caught:
        load(Settings)
    message = str(caught.value)
    assert "3 bad variables" in message
    for name in ("HTTP_PORT", "LOG_LEVEL", "HTTP_DRAIN_SECONDS"):
        assert name in message


class _ServiceSettings(Settings):
    partner_api_key: SecretStr


def test_missing_required_variable_is_named_and_no_value_is_echoed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PARTNER_API_KEY", raising=False)
    monkeypatch.setenv("HTTP_PORT", "s3cr3t-not-a-port")
    with pytest.raises(ConfigError) as caught:
        load(_ServiceSettings)
    message = str(caught.value)
    assert "PARTNER_API_KEY: Field required" in message
    assert "HTTP_PORT" in message
    assert "s3cr3t" not in message


def test_kiban_run_refuses_to_start_half_configured() -> None:
    """The real command exits 2 with the names on stderr, before serving anything."""
    result = subprocess.run(
        [sys.executable, "-m", "kiban._cli", "run", "tests.apps.hello:app"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HTTP_PORT": "-5", "LOG_FORMAT": "xml"},
    )
    assert result.returncode == 2, result.stderr
    assert "HTTP_PORT" in result.stderr
    assert "LOG_FORMAT" in result.stderr
    assert "Traceback" not in result.stderr
