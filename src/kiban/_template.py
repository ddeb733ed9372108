"""``kiban new`` and ``kiban update``: services made from, and kept in step with, one template.

The template is a copier template (``copier.yml`` beside ``template/`` in the kiban
repository). ``update`` is copier's: it renders the template at the version the
service was made from, diffs that against the service, and replays the service's own
changes onto the new version; what cannot be replayed is reported, file by file.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kiban import _extras

__all__ = ["conflicts", "default_template", "new", "update"]

CONFLICT_MARKERS = ("<<<<<<< before updating", ">>>>>>> after updating")


def default_template() -> Path:
    """The template shipped with this kiban checkout."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "copier.yml").exists():
        raise FileNotFoundError("no kiban template found; pass --template")
    return root


def new(
    name: str,
    destination: Path,
    answers: Mapping[str, Any],
    template: str | None = None,
    interactive: bool = False,
) -> Path:
    _extras.require("copier", "cli", "kiban new")
    from copier import run_copy

    data = {"service_name": name, **{k: v for k, v in answers.items() if v is not None}}
    run_copy(
        str(template or default_template()),
        destination,
        data=data,
        defaults=not interactive,
        quiet=False,
        unsafe=False,
    )
    return destination


def update(destination: Path, vcs_ref: str | None = None) -> list[str]:
    """Bring ``destination`` to the template's newest version; return the conflicts."""
    _extras.require("copier", "cli", "kiban update")
    from copier import run_update

    run_update(
        destination,
        defaults=True,
        overwrite=True,
        conflict="rej",
        vcs_ref=vcs_ref,
        quiet=False,
        unsafe=False,
    )
    return conflicts(destination)


def conflicts(destination: Path) -> list[str]:
    """Files an update could not merge: ``.rej`` leftovers and inline conflict markers."""
    found = []
    for path in sorted(destination.rglob("*")):
        if any(part in {".git", ".venv", ".tools"} for part in path.parts) or not path.is_file():
            continue
        relative = str(path.relative_to(destination))
        if path.suffix == ".rej":
            found.append(relative)
            continue
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        if any(marker in text for marker in CONFLICT_MARKERS):
            found.append(relative)
    return found


def report(found: list[str]) -> int:
    if not found:
        print("updated cleanly")
        return 0
    print(f"{len(found)} file(s) need a manual merge:", file=sys.stderr)
    for name in found:
        print(f"  {name}", file=sys.stderr)
    print(
        "resolve them (the .rej files hold the template's change), delete the .rej files, "
        "and commit",
        file=sys.stderr,
    )
    return 1
