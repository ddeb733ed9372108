"""The kiban command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jwt
import pytest

import kiban
from tests.conftest import DEV_KEYS, ROOT


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
