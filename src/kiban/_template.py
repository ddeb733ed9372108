"""``kiban new`` and ``kiban update``: services made from, and kept in step with, one template.

The template ships inside kiban's package (``kiban/_service_template``), versioned with
kiban: ``kiban new`` works from an installed wheel, with no checkout anywhere. A
generated service records the kiban version whose template made it
(``.copier-answers.yml``: ``_commit: v0.1.0``), and depends on kiban by version.

``kiban update`` is copier's three-way update: render the template at the version the
service was made from, diff that against the service, and replay the service's own
changes onto the template of the kiban now installed. copier updates only from a git
repository, so kiban builds one from the template versions it carries
(``history/<version>/`` for past releases, and its own), one tagged commit per version,
at ``~/.cache/kiban/service-template``: the path the answers record, the same words on
every machine. Anyone who clones the service and installs a newer kiban can update it.
Conflicts are left inline, with markers, in the files themselves.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib.resources import as_file, files
from pathlib import Path
from typing import Any

from kiban import _extras

__all__ = ["conflicts", "default_template", "dependency", "new", "update"]

CONFLICT_MARKERS = ("<<<<<<< before updating", ">>>>>>> after updating")
#: Where a service's answers say its template is (``_src_path``): the same words on
#: every machine. kiban builds the repository there from the versions it carries.
PACKAGED = "~/.cache/kiban/service-template"
_ANSWERS = ".copier-answers.yml"


def _version() -> str:
    from kiban import __version__

    return __version__


def dependency(version: str | None = None) -> str:
    """How a generated service depends on kiban: this minor series, ``>=0.1.0,<0.2``."""
    version = version or _version()
    major, minor = (int(part) for part in version.split(".")[:2])
    return f"kiban>={version},<{major}.{minor + 1}"


@contextmanager
def default_template() -> Iterator[Path]:
    """The template of the installed kiban, as a folder (``copier.yml`` and ``template/``)."""
    with as_file(files("kiban") / "_service_template") as found:
        if not (found / "copier.yml").exists():
            raise FileNotFoundError("this kiban carries no service template")
        yield found


@contextmanager
def _root(root: Path | None) -> Iterator[Path]:
    if root is not None:
        yield root
        return
    with default_template() as found:
        yield found


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version))


def _git(*args: str, cwd: Path) -> None:
    subprocess.run(
        ["git", "-c", "user.name=kiban", "-c", "user.email=kiban@localhost", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
    )


def versions(root: Path) -> list[tuple[str, Path]]:
    """The template versions ``root`` carries, oldest first: its history, then its own."""
    history = root / "history"
    found = [(path.name, path) for path in history.iterdir()] if history.is_dir() else []
    found.sort(key=lambda item: _key(item[0]))
    found.append((_version(), root))
    return found


def repository(root: Path, destination: Path) -> Path:
    """A git repository with one tagged commit (``v<version>``) per template version."""
    destination.mkdir(parents=True)
    _git("init", "-q", cwd=destination)
    for version, source in versions(root):
        for child in destination.iterdir():
            if child.name != ".git":
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        shutil.copy(source / "copier.yml", destination / "copier.yml")
        shutil.copytree(source / "template", destination / "template")
        _git("add", "-A", cwd=destination)
        _git("commit", "-q", "--allow-empty", "-m", f"kiban {version}", cwd=destination)
        _git("tag", f"v{version}", cwd=destination)
    return destination


def fingerprint(root: Path) -> str:
    """What the template versions ``root`` carries hash to: names, paths and contents."""
    import hashlib

    digest = hashlib.sha256()
    for version, source in versions(root):
        digest.update(version.encode())
        for path in sorted([source / "copier.yml", *(source / "template").rglob("*")]):
            if path.is_file():
                digest.update(str(path.relative_to(source)).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()


def materialize(root: Path) -> Path:
    """Build the template repository where ``PACKAGED`` points, from ``root``'s versions.

    Left as it is when it already holds exactly these versions (another kiban command
    may be reading it); otherwise built in a fresh folder and renamed into place.
    """
    target = Path(PACKAGED).expanduser()
    wanted = fingerprint(root)
    stamp = target / ".git" / "kiban-fingerprint"
    if stamp.is_file() and stamp.read_text() == wanted:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="service-template-", dir=target.parent))
    repository(root, scratch / "repo")
    (scratch / "repo" / ".git" / "kiban-fingerprint").write_text(wanted)
    if target.exists():
        shutil.rmtree(target, ignore_errors=True)
    (scratch / "repo").rename(target)
    scratch.rmdir()
    return target


def recorded_source(destination: Path) -> str | None:
    answers = destination / _ANSWERS
    if not answers.exists():
        return None
    found = re.search(r"(?m)^_src_path: (.*)$", answers.read_text())
    return found.group(1).strip() if found else None


def new(
    name: str,
    destination: Path,
    answers: Mapping[str, Any],
    template: str | None = None,
    interactive: bool = False,
    root: Path | None = None,
) -> Path:
    """Render a new service into ``destination`` (which must not exist or be empty).

    ``template`` is another copier template; ``root`` another folder laid out as kiban's
    packaged one (tests stand a release in with it).
    """
    _extras.require("copier", "cli", "kiban new")
    from copier import run_copy

    data = {"service_name": name, **{k: v for k, v in answers.items() if v is not None}}
    options: dict[str, Any] = {"data": data, "defaults": not interactive, "quiet": True}
    if template is not None:
        run_copy(template, destination, unsafe=False, **options)
        return destination
    with _root(root) as found:
        materialize(found)
        run_copy(PACKAGED, destination, vcs_ref=f"v{_version()}", unsafe=False, **options)
    return destination


def update(destination: Path, vcs_ref: str | None = None, root: Path | None = None) -> list[str]:
    """Bring ``destination`` to the installed kiban's template; return the conflicts."""
    _extras.require("copier", "cli", "kiban update")
    from copier import run_update

    options: dict[str, Any] = {
        "defaults": True,
        "overwrite": True,
        "conflict": "inline",
        "quiet": True,
        "unsafe": False,
    }
    if recorded_source(destination) != PACKAGED:
        run_update(destination, vcs_ref=vcs_ref, **options)
        return conflicts(destination)
    with _root(root) as found:
        materialize(found)
        run_update(destination, vcs_ref=vcs_ref or f"v{_version()}", **options)
    return conflicts(destination)


def conflicts(destination: Path) -> list[str]:
    """Files an update could not merge: inline conflict markers and ``.rej`` leftovers."""
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
        "in each, the lines between '<<<<<<< before updating' and '=======' are the "
        "service's, those between '=======' and '>>>>>>> after updating' the new "
        "template's: keep what is right, remove the markers, and commit",
        file=sys.stderr,
    )
    return 1
