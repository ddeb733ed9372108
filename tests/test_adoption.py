"""The adopter's journey, from kiban's wheel, in folders that never saw this checkout.

Build the wheel; install the core into a fresh virtualenv and measure it; install the
CLI; ``kiban new`` a service that depends on kiban by version from a wheelhouse; run
that service's own ``make test``; serve it with ``make run`` on its development keys;
probe it, audit it with ``kiban check``, write to it with a ``make token`` token; and
``kiban update`` it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import LOGS, ROOT, free_port

pytestmark = pytest.mark.process
UV = ROOT / ".tools/bin/uv"
#: The core's measured footprint (README, "Install"): dependencies and installed size.
CORE_PACKAGES = 30  # kiban and its dependencies, the budget
CORE_MIB = 60


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment of a shell outside the checkout: no virtualenv, no PYTHONPATH."""
    drop = {"VIRTUAL_ENV", "PYTHONPATH", "UV_PROJECT_ENVIRONMENT", "PYTEST_ADDOPTS"}
    env = {name: value for name, value in os.environ.items() if name not in drop}
    env["PATH"] = ":".join(
        part for part in env.get("PATH", "").split(":") if not part.startswith(str(ROOT))
    )
    return {**env, **extra}


def _attempt(
    *args: str | Path, cwd: Path, timeout: float = 600, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run a command as an adopter's shell would, whatever its exit status."""
    return subprocess.run(
        [str(arg) for arg in args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_clean_env(**env),
        check=False,
    )


def _run(*args: str | Path, cwd: Path, timeout: float = 600, **env: str) -> str:
    done = _attempt(*args, cwd=cwd, timeout=timeout, **env)
    assert done.returncode == 0, f"{args}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder outside the checkout holding ``wheelhouse/`` with kiban's wheel."""
    place = tmp_path_factory.mktemp("adopter")
    assert ROOT not in place.parents
    _run(UV, "build", "--wheel", "--out-dir", place / "wheelhouse", ROOT, cwd=place)
    return place


def _venv(place: Path, name: str, requirement: str) -> Path:
    _run(UV, "venv", "--quiet", "--python", sys.executable, place / name, cwd=place)
    wheel = next((place / "wheelhouse").glob("kiban-*.whl"))
    _run(
        UV,
        "pip",
        "install",
        "--quiet",
        "--python",
        place / name / "bin/python",
        f"{requirement} @ {wheel.as_uri()}",
        cwd=place,
    )
    return place / name


def test_the_core_is_small_typed_and_names_a_missing_extra(outside: Path) -> None:
    venv = _venv(outside, "core", "kiban")
    frozen = _run(UV, "pip", "freeze", "--python", venv / "bin/python", cwd=outside)
    packages = [line for line in frozen.splitlines() if "==" in line or " @ " in line]
    (site,) = (venv / "lib").glob("python3*/site-packages")
    size = sum(path.stat().st_size for path in site.rglob("*") if path.is_file()) / 2**20
    assert len(packages) <= CORE_PACKAGES, packages
    assert size <= CORE_MIB
    assert (site / "kiban/py.typed").exists()
    assert (site / "kiban/_service_template/copier.yml").exists()
    for heavy in ("sqlalchemy", "grpc", "sentry_sdk", "copier", "jwt", "alembic"):
        assert not (site / heavy).exists(), heavy

    # Typed for a downstream ``mypy --strict``: a misuse is an error, not an Any.
    (outside / "typed_use.py").write_text(
        "from fastapi import FastAPI\n"
        "import kiban\n"
        "from kiban.security import NoSecurity\n"
        "service: kiban.Service = kiban.Service(FastAPI(), security=NoSecurity())\n"
        "port: str = service.settings.http_port\n"
    )
    checked = _attempt(
        ROOT / ".venv/bin/mypy",
        "--strict",
        "--python-executable",
        venv / "bin/python",
        "--no-incremental",
        "typed_use.py",
        cwd=outside,
        timeout=300,
    )
    assert checked.returncode == 1, checked.stdout
    (error,) = [line for line in checked.stdout.splitlines() if ": error:" in line]
    assert (
        'typed_use.py:5: error: Incompatible types in assignment (expression has type "int"'
        in error
    )

    (outside / "keyed.py").write_text(
        "from fastapi import FastAPI\n"
        "import kiban\n"
        "from kiban.security import JWT, Security\n"
        "def create_app():\n"
        "    user = JWT(algorithms=['EdDSA'], key=b'k')\n"
        "    return kiban.Service(FastAPI(), security=Security(user))\n"
    )
    done = _attempt(venv / "bin/kiban", "run", "keyed:create_app", cwd=outside, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "kiban: JWT verification needs kiban[jwt]: pip install 'kiban[jwt]'"
    )
    (outside / "exporting.py").write_text(
        "from fastapi import FastAPI\n"
        "import kiban\n"
        "from kiban.security import NoSecurity\n"
        "def create_app():\n"
        "    return kiban.Service(FastAPI(), security=NoSecurity())\n"
    )
    done = _attempt(
        venv / "bin/kiban",
        "run",
        "exporting:create_app",
        cwd=outside,
        timeout=60,
        OTLP_ENDPOINT="http://collector:4317",
        SENTRY_DSN="https://k@h/1",
    )
    assert done.returncode == 2
    assert "OTLP_ENDPOINT: needs kiban[otlp]" in done.stderr
    assert "SENTRY_DSN: needs kiban[sentry]" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.integration
def test_a_service_made_from_the_wheel_runs_as_its_readme_says(outside: Path) -> None:
    venv = _venv(outside, "cli", "kiban[cli,jwt,grpc]")
    kiban = venv / "bin/kiban"
    wheelhouse = outside / "wheelhouse"
    _run(
        kiban,
        "new",
        "billing",
        "--database",
        "sqlite",
        "--grpc",
        "--find-links",
        wheelhouse,
        cwd=outside,
    )
    service = outside / "billing"
    pyproject = (service / "pyproject.toml").read_text()
    assert "kiban[otlp,sentry,jwt,debug,grpc,db]>=0.1.0,<0.2" in pyproject
    assert str(ROOT) not in pyproject
    assert (service / ".dev/signing-key.pem").stat().st_mode & 0o077 == 0
    assert ".dev/" in (service / ".gitignore").read_text()

    assert "passed" in _run("make", "test", cwd=service)
    assert str(ROOT) not in (service / "uv.lock").read_text()

    port, grpc_port = free_port(), free_port()
    log = outside / "billing.log"
    LOGS.append(log)
    process = _make(
        "run",
        service,
        log,
        HTTP_PORT=str(port),
        GRPC_PORT=str(grpc_port),
        LOG_FORMAT="json",
        TRUSTED_PROXIES="127.0.0.1",
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _until(process, log, lambda: httpx.get(f"{url}/health/readiness").status_code == 200)
        audit = _attempt(
            kiban,
            "check",
            url,
            "--log",
            log,
            "--grpc",
            f"127.0.0.1:{grpc_port}",
            cwd=outside,
            timeout=120,
        )
        assert audit.returncode == 0, audit.stdout + audit.stderr
        assert "grpc security" in audit.stdout  # its gRPC side was audited too
        token = _run("make", "-s", "token", "SUB=adopter", "SCOPES=items:write", cwd=service)
        created = httpx.post(
            f"{url}/items",
            json={"name": "first"},
            headers={"authorization": f"Bearer {token.strip()}"},
        )
        assert created.status_code == 201, created.text
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=30)

    _dev_shows_the_service(service, log)

    for args in (("init", "-q"), ("add", "-A"), ("commit", "-qm", "billing")):
        _run("git", "-c", "user.name=a", "-c", "user.email=a@b", *args, cwd=service)
    updated = _run(kiban, "update", "--dest", service, cwd=outside)
    assert "updated cleanly" in updated
    shutil.rmtree(service / ".venv")


def _dev_shows_the_service(service: Path, log: Path) -> None:
    """``make dev``: the service beside the dashboard, both from the wheel (its pages are
    package data), the service's requests on the dashboard."""
    dashboard_port, port = free_port(), free_port()
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    process = _make(
        "dev",
        service,
        log,
        KIBAN_DEV_PORT=str(dashboard_port),
        BILLING_PORT=str(port),
        GRPC_PORT=str(free_port()),
        LOG_FORMAT="json",
    )

    def shown(path: str, predicate: Any) -> Any:
        return _until(process, log, lambda: predicate(httpx.get(dashboard + path).json()))

    try:
        shown(
            "/api/services",
            lambda body: (
                [(s["name"], s["readiness"].get("status")) for s in body["services"]]
                == [("billing", "ok")]
            ),
        )
        assert 'src="/static/app.js"' in httpx.get(dashboard).text
        assert httpx.get(f"{dashboard}/static/app.js").status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/items").status_code == 401
        shown(
            "/api/requests",
            lambda body: (
                [(r["service"], r["path"], r["status"]) for r in body["requests"]]
                == [("billing", "/items", 401)]
            ),
        )
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=30)


def _make(target: str, service: Path, log: Path, **env: str) -> subprocess.Popen[bytes]:
    """``make TARGET`` in the service, as an adopter's shell runs it, output added to ``log``."""
    with log.open("ab") as output:
        return subprocess.Popen(
            ["make", target],
            cwd=service,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=_clean_env(**env),
            start_new_session=True,
        )


def _until(process: subprocess.Popen[bytes], log: Path, check: Any, timeout: float = 60) -> Any:
    """``check()``'s first true value while ``process`` runs (not reachable yet: again)."""
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, log.read_text()
        try:
            found = check()
            if found:
                return found
        except (httpx.TransportError, ValueError):
            pass
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
