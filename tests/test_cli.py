"""The kiban command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest

import kiban
from tests.conftest import DEV_KEYS, ROOT, free_port


def _kiban(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kiban", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_token_mints_verifiable_development_tokens() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kiban",
            "token",
            "jwt",
            "--sub",
            "ops",
            "--scope",
            "members:admin",
            "--scope",
            "members:read",
            "--ttl",
            "60",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    claims = jwt.decode(
        result.stdout.strip(),
        (DEV_KEYS / "auth-dev.pub.pem").read_bytes(),
        algorithms=["EdDSA"],
        issuer="kiban-dev-auth",
    )
    assert claims["sub"] == "ops"
    assert claims["scope"] == "members:admin members:read"
    assert claims["exp"] - claims["iat"] == 60
    internal = subprocess.run(
        [sys.executable, "-m", "kiban", "token", "internal", "--sub", "u-42"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    claims = jwt.decode(
        internal,
        (DEV_KEYS / "gateway-dev.pub.pem").read_bytes(),
        algorithms=["EdDSA"],
        issuer="kiban-dev-gateway",
    )
    assert claims["sub"] == "u-42"


def test_token_without_a_key_says_so() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kiban", "token", "jwt", "--sub", "x", "--key", "/nope.pem"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "no key at /nope.pem" in result.stderr


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("class", "keyword"),
        ("import", "keyword"),
        ("kiban", "shadow"),
        ("json", "shadow"),
        ("tests", "shadow"),
        ("billing-", "not a service name"),
        ("Billing", "not a service name"),
        ("b" * 41, "not a service name"),
    ],
)
def test_new_refuses_names_that_make_broken_services(name: str, says: str, tmp_path: Path) -> None:
    result = _kiban("new", name, "--dest", str(tmp_path / "svc"))
    assert result.returncode == 2
    assert says in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "svc").exists()


def test_new_never_writes_into_a_folder_with_files(tmp_path: Path) -> None:
    taken = tmp_path / "billing"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep me")
    result = _kiban("new", "billing", "--dest", str(taken))
    assert result.returncode == 2
    assert "not empty" in result.stderr
    assert "--overwrite" not in result.stderr
    assert [path.name for path in taken.iterdir()] == ["mine.txt"]


def test_version_and_colourless_output_when_piped() -> None:
    result = _kiban("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"kiban {kiban.__version__}"
    assert "\x1b[" not in result.stdout + result.stderr


@pytest.fixture
def odd_server(tmp_path: Path) -> Iterator[str]:
    """A web server that is not a kiban service: HTML pages and JSON lists."""
    (tmp_path / "health").mkdir()
    (tmp_path / "health/liveness").write_text("[1, 2]")
    (tmp_path / "health/readiness").write_text("[]")
    (tmp_path / "index.html").write_text("<html><body>hello</body></html>")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                httpx.get(url)
                break
            except httpx.TransportError:
                time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_check_reports_a_foreign_server_without_a_traceback(odd_server: str) -> None:
    result = _kiban("check", odd_server)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "FAIL" in result.stdout
    assert result.stdout.strip().splitlines()[-1].endswith("failed")

    as_json = _kiban("check", odd_server, "--json")
    assert as_json.returncode == 1
    document = json.loads(as_json.stdout)
    assert document["reachable"] is True
    assert document["failed"] >= 1
    assert {"check", "ok", "detail", "fix"} <= set(document["checks"][0])


def test_check_tells_unreachable_and_missing_log_apart_from_findings(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = _kiban("check", url)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [f"kiban: cannot reach {url}: ConnectError"]
    as_json = _kiban("check", url, "--json")
    assert as_json.returncode == 2
    assert json.loads(as_json.stdout)["reachable"] is False
    missing = _kiban("check", url, "--log", str(tmp_path / "missing.log"))
    assert missing.returncode == 2
    assert "no log file" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_run_says_when_the_target_is_not_a_kiban_service() -> None:
    for target, says in (
        ("tests.apps.plain:app", "is not a kiban service"),
        ("tests.apps.nowhere:app", "no module 'tests.apps.nowhere'"),
        ("tests.apps.plain:nothing", "has no 'nothing'"),
        ("plain", "expected module:attribute"),
    ):
        result = _kiban("run", target, "--port", "0")
        assert result.returncode == 2, (target, result.stderr)
        assert says in result.stderr
        assert "Traceback" not in result.stderr


def test_console_lines_have_no_colour_codes_off_a_terminal_or_under_no_color() -> None:
    code = (
        "import io, os, sys\n"
        "from kiban import log\n"
        "class Tty(io.BytesIO):\n"
        "    def isatty(self): return True\n"
        "stream = Tty()\n"
        "log.configure(fmt='console', stream=stream)\n"
        "log.warning('hello')\n"
        "sys.stdout.write(repr(stream.getvalue()))\n"
    )
    coloured = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "NO_COLOR": ""},
    )
    assert "\\x1b[" in coloured.stdout
    plain = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "NO_COLOR": "1"},
    )
    assert "hello" in plain.stdout
    assert "\\x1b[" not in plain.stdout
