"""The request path as kiban's wheel ships it: its modules compiled with mypyc.

``make test`` runs the suite twice: on the sources, interpreted, and then with the
compiled wheel first on the path and ``KIBAN_EXPECT_COMPILED=1``. Each pass is held to
what it says it tests.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _compiled_modules() -> list[str]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    hook = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["hooks"]["mypyc"]
    return [
        path.removeprefix("src/").removesuffix(".py").replace("/", ".") for path in hook["include"]
    ]


def test_the_request_path_runs_as_this_pass_says() -> None:
    expected = os.environ.get("KIBAN_EXPECT_COMPILED") == "1"
    modules = _compiled_modules()
    assert "kiban.chassis" in modules
    for name in modules:
        origin = importlib.import_module(name).__file__ or ""
        compiled = origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
        assert compiled is expected, f"{name} is loaded from {origin}"
