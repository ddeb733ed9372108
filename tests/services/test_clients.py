"""The committed typed client matches the members API it calls."""

from __future__ import annotations

import filecmp
import importlib.metadata
import re
from pathlib import Path

import pytest

from services.clients import CLIENTS, PROTOS, generate, generate_stubs
from tests.conftest import ROOT

#: What the generated code depends on: the OpenAPI document (FastAPI, pydantic), the
#: generator and the formatter it runs. The committed client is made with the lock's.
GENERATED_WITH = ("fastapi", "pydantic", "openapi-python-client", "ruff")


def _locked(name: str) -> str | None:
    lock = (ROOT / "uv.lock").read_text()
    found = re.search(rf'\nname = "{re.escape(name)}"\nversion = "([^"]+)"', lock)
    return found.group(1) if found else None


def _differences(left: Path, right: Path) -> list[str]:
    comparison = filecmp.dircmp(left, right, ignore=["__pycache__", ".ruff_cache"])
    found = [*comparison.left_only, *comparison.right_only, *comparison.diff_files]
    for name in comparison.common_dirs:
        found += _differences(left / name, right / name)
    return found


def test_generated_members_client_is_up_to_date(tmp_path: Path) -> None:
    other = [
        f"{name} {importlib.metadata.version(name)} (lock: {_locked(name)})"
        for name in GENERATED_WITH
        if importlib.metadata.version(name) != _locked(name)
    ]
    if other:  # the lowest and newest runs: other tools write other code, rightly
        pytest.skip("the client is generated with the lock's tools; here: " + ", ".join(other))
    fresh = tmp_path / "members_client"
    generate("members", fresh)
    assert _differences(CLIENTS["members"], fresh) == [], (
        "the members API changed: run `python -m services.clients` and commit the result"
    )


@pytest.mark.parametrize("proto", PROTOS)
def test_committed_grpc_stubs_match_their_proto(proto: str, tmp_path: Path) -> None:
    tool = importlib.metadata.version("grpcio-tools")
    if tool != _locked("grpcio-tools"):
        pytest.skip(f"stubs are generated with the lock's grpcio-tools; here: {tool}")
    for fresh in generate_stubs(proto, tmp_path):
        committed = ROOT / fresh.relative_to(tmp_path)
        assert committed.read_text() == fresh.read_text(), (
            f"{committed.relative_to(ROOT)} differs from {proto}: "
            "run `python -m services.clients` and commit the result"
        )
