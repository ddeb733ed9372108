"""kiban as its wheel installs it: ``python -m bench.compiled [DIR]`` prints where.

The wheel's request-path modules are compiled with mypyc (pyproject.toml's mypyc build
hook, enabled by ``HATCH_BUILD_HOOK_ENABLE_MYPYC``); the editable install that
development uses runs the same modules interpreted. ``make bench`` measures the wheel
(and the interpreted modules beside it) and ``make test`` runs the suite against it
too, with ``DIR`` first on ``PYTHONPATH``.

The wheel is built from a copy of the sources (the build hook writes its extension
modules next to the files it compiles, where they would shadow the sources being
edited) with this environment's locked build tools, and rebuilt only when a source
or pyproject.toml changed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT / ".run" / "compiled"


def _fingerprint() -> str:
    digest = hashlib.sha256()
    files = [ROOT / "pyproject.toml", *sorted((ROOT / "src" / "kiban").rglob("*.py"))]
    for path in files:
        digest.update(str(path.relative_to(ROOT)).encode())
        digest.update(path.read_bytes())
    digest.update(sys.version.encode())
    return digest.hexdigest()


def build(target: Path = DEFAULT) -> Path:
    """The directory holding kiban unpacked from its compiled wheel, built if stale."""
    stamp = target / ".fingerprint"
    fingerprint = _fingerprint()
    if stamp.exists() and stamp.read_text() == fingerprint:
        return target
    tools_uv = ROOT / ".tools" / "bin" / "uv"  # the Makefile's
    uv = str(tools_uv) if tools_uv.exists() else shutil.which("uv") or "uv"
    with tempfile.TemporaryDirectory() as scratch:
        source = Path(scratch) / "source"
        shutil.copytree(
            ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.so")
        )
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(ROOT / name, source / name)
        dist = Path(scratch) / "dist"
        built = subprocess.run(
            [
                uv,
                "build",
                "--wheel",
                "--no-build-isolation",
                "--python",
                sys.executable,
                "--out-dir",
                str(dist),
                str(source),
            ],
            env={**os.environ, "HATCH_BUILD_HOOK_ENABLE_MYPYC": "true"},
            capture_output=True,
            text=True,
        )
        if built.returncode:
            raise SystemExit(
                f"building kiban's compiled wheel failed:\n{built.stdout}{built.stderr}"
            )
        (wheel,) = dist.glob("kiban-*.whl")
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(target)
    stamp.write_text(fingerprint)
    return target


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT))
