"""The kiban command."""

from __future__ import annotations

import subprocess
import sys

import jwt

from tests.conftest import DEV_KEYS, ROOT


def test_token_mints_verifiable_development_tokens() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kiban._cli",
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
        [sys.executable, "-m", "kiban._cli", "token", "internal", "--sub", "u-42"],
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
        [sys.executable, "-m", "kiban._cli", "token", "jwt", "--sub", "x", "--key", "/nope.pem"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "no key at /nope.pem" in result.stderr
