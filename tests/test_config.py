"""Configuration comes from the environment and fails loudly, naming every bad variable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import Field, SecretStr

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
        [sys.executable, "-m", "kiban", "run", "tests.apps.hello:app"],
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


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("DATABASE_URL", "nonsense", "not a database URL"),
        ("DATABASE_URL", "postgresql://db/app", "not an async driver; use postgresql+asyncpg"),
        ("DATABASE_URL", "mysql+pymysql://db/app", "not an async driver"),
        ("REDIS_URL", "http://cache:6379", "not a Redis URL"),
        ("OTLP_ENDPOINT", "collector:4317", "not a collector URL"),
        ("SENTRY_DSN", "nonsense-s3cr3t", "not a Sentry DSN"),
        ("TRACE_SAMPLE_RATIO", "2", "TRACE_SAMPLE_RATIO"),
        ("AUTH_FAILURE_LIMIT", "lots", "not a rate"),
        ("LOG_MAX_HELD_BYTES", "65536", "262144"),  # less than four of the writer's chunks
        ("DATABASE_CONNECT_TIMEOUT", "0", "greater than 0"),
        ("REDIS_TIMEOUT", "-1", "greater than 0"),
    ],
)
def test_values_outside_pydantics_types_are_checked_at_start_up(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, says: str
) -> None:
    """URLs and DSNs are parsed when settings load: one line, the name, never the value."""
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load(Settings)
    message = str(caught.value)
    assert f"  {name}: " in message
    assert says in message
    assert "s3cr3t" not in message
    assert "Value error" not in message


def test_level_and_mode_names_are_case_insensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOG_LEVEL", "INFO")
    monkeypatch.setenv("LOG_FORMAT", "Json")
    monkeypatch.setenv("OTLP_PROTOCOL", "HTTP/PROTOBUF")
    settings = load(Settings)
    assert (settings.log_level, settings.log_format) == ("info", "json")
    assert settings.otlp_protocol == "http/protobuf"


class _KeyedSettings(Settings):
    api_keys: dict[str, SecretStr] = Field(default_factory=dict)


def test_a_json_setting_that_is_not_json_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_KEYS", "notjson-s3cr3t")
    with pytest.raises(ConfigError) as caught:
        load(_KeyedSettings)
    assert "  API_KEYS: not valid JSON" in str(caught.value)
    assert "s3cr3t" not in str(caught.value)


def test_a_jwt_key_that_does_not_parse_stops_the_service() -> None:
    """Not "ready" and then refusing every request: the verifier parses its key up front."""
    from kiban.security import TokenVerifier

    with pytest.raises(ConfigError, match="not a valid RS256 key"):
        TokenVerifier(algorithms=["RS256"], key=b"garbage")


def test_a_service_with_a_bad_jwt_key_exits_2_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "keyed.py").write_text(
        "import os\n"
        "from fastapi import FastAPI\n"
        "import kiban\n"
        "from kiban.security import JWT, Security\n"
        "def create_app():\n"
        "    app = FastAPI()\n"
        "    user = JWT(algorithms=['RS256'], key=os.environ['JWT_PUBLIC_KEY'].encode())\n"
        "    return kiban.Service(app, security=Security(user))\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "kiban", "run", "keyed:create_app"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "JWT_PUBLIC_KEY": "garbage", "HTTP_PORT": "0"},
    )
    assert result.returncode == 2, result.stderr
    assert "not a valid RS256 key" in result.stderr
    assert "Traceback" not in result.stderr
