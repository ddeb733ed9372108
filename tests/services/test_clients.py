"""The committed typed client matches the members API it calls."""

from __future__ import annotations

import filecmp
from pathlib import Path

from services.clients import CLIENTS, generate


def _differences(left: Path, right: Path) -> list[str]:
    comparison = filecmp.dircmp(left, right, ignore=["__pycache__", ".ruff_cache"])
    found = [*comparison.left_only, *comparison.right_only, *comparison.diff_files]
    for name in comparison.common_dirs:
        found += _differences(left / name, right / name)
    return found


def test_generated_members_client_is_up_to_date(tmp_path: Path) -> None:
    fresh = tmp_path / "members_client"
    generate("members", fresh)
    assert _differences(CLIENTS["members"], fresh) == [], (
        "the members API changed: run `python -m services.clients` and commit the result"
    )
