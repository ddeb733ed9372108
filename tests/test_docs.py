"""Docs that run: every Python snippet in README.md and docs/ executes as written.

A snippet that defines ``app`` is also served: its start-up resolves security (a route
left without a requirement would stop it) and liveness answers.
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from tests.conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SNIPPETS = [
    pytest.param(page, code, id=f"{page.name}:{text[: match.start()].count(chr(10)) + 1}")
    for page in PAGES
    for text in [page.read_text()]
    for match in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M)
    for code in [match.group(1)]
]


def test_the_docs_have_snippets() -> None:
    assert len(SNIPPETS) >= 6


@pytest.mark.parametrize(("page", "code"), SNIPPETS)
def test_snippet_runs_as_written(
    page: Path, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path}/docs.db")
    monkeypatch.chdir(ROOT)
    module = types.ModuleType(f"docs_{page.stem}")  # a real module: ORMs resolve names in it
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(code, str(page), "exec"), module.__dict__)  # noqa: S102
    app = module.__dict__.get("app")
    if app is not None:
        with TestClient(app) as client:  # type: ignore[arg-type]
            assert client.get("/health/liveness").status_code == 200


def _resolve(dotted: str) -> object:
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found: object = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for part in parts[cut:]:
            found = getattr(found, part)
        return found
    raise ImportError(dotted)


def test_every_documented_name_exists() -> None:
    """``kiban.x.y`` in prose and ``from kiban... import a, b`` anywhere name real things."""
    metrics = (ROOT / "src/kiban/_telemetry.py").read_text()
    missing = []
    for page in PAGES:
        text = page.read_text()
        names = {
            match.group(1).rstrip(".")
            for match in re.finditer(r"`(kiban(?:\.[A-Za-z_]\w*)+)(?:\(|`)", text)
        }
        for match in re.finditer(r"from (kiban[\w.]*) import ([\w, ]+)", text):
            names.update(f"{match.group(1)}.{name.strip()}" for name in match.group(2).split(","))
        for name in sorted(names):
            if name.split(".")[1].startswith("_") or name == "kiban.toml":
                continue  # a source location (kiban/_server.py), kiban dev's file
            if f'"{name}"' in metrics:
                continue  # a metric's name
            try:
                _resolve(name)
            except (ImportError, AttributeError):
                missing.append(f"{page.name}: {name}")
    assert missing == []


def test_every_relative_link_points_at_a_file() -> None:
    """Links and images in README.md and docs/ (the dashboard's screenshot among them)."""
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)", page.read_text()):
            if "://" not in target and not target.startswith("mailto:"):
                assert (page.parent / target).exists(), f"{page.name}: {target}"
