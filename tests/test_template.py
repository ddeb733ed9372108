"""kiban new, update and check, on real generated services."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from kiban._server import Server
from kiban.security._tokens import mint
from tests.conftest import LOGS, ROOT, free_port

pytestmark = pytest.mark.process
KIBAN = [sys.executable, "-m", "kiban"]
TEMPLATE = ROOT / "src/kiban/_service_template"


def kiban(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*KIBAN, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )


def generate(destination: Path, *options: str) -> Path:
    result = kiban(
        "new", "demo-svc", "--dest", str(destination), "--kiban-source", ROOT.as_uri(), *options
    )
    assert result.returncode == 0, result.stderr
    return destination


def git(*args: str, cwd: Path) -> None:
    subprocess.run(
        ["git", "-c", "user.name=kiban", "-c", "user.email=kiban@example.com", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
    )


def wait_up(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        try:
            if httpx.get(f"{url}/health/liveness").status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError(log.read_text())


@pytest.mark.integration
def test_a_new_service_passes_its_own_tests_and_the_audit(
    tmp_path: Path, postgres_url: str
) -> None:
    service = generate(
        tmp_path / "demo-svc", "--database", "postgresql", "--api-security", "jwt", "--grpc"
    )
    for expected in (
        "src/demo_svc/app.py",
        "src/demo_svc/grpc_api.py",
        "src/demo_svc/rpc/items.proto",
        "tests/test_grpc.py",
        "src/demo_svc/routes.py",
        "tests/test_items.py",
        "src/demo_svc/migrations/versions/0001_items.py",
        "Dockerfile",
        "k8s/deployment.yaml",
        ".ci/run",
        ".copier-answers.yml",
    ):
        assert (service / expected).exists(), expected
    # Its own `make test` (which first makes the gRPC stubs from the proto), against
    # SQLite and against the real PostgreSQL.
    result = subprocess.run(
        ["make", "test"],
        cwd=service,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TEST_DATABASE_URL": postgres_url},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "19 passed" in result.stdout
    assert (service / "src/demo_svc/rpc/items_pb2_grpc.py").exists()

    private = ed25519.Ed25519PrivateKey.generate()
    key = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    port, grpc_port = free_port(), free_port()
    log = tmp_path / "demo-svc.log"
    LOGS.append(log)

    def start() -> subprocess.Popen[bytes]:
        with log.open("ab") as output:
            return subprocess.Popen(
                [str(service / ".venv/bin/kiban"), "run", "demo_svc.app:create_app"],
                cwd=service,
                stdout=output,
                stderr=subprocess.STDOUT,
                env={
                    **os.environ,
                    "HTTP_PORT": str(port),
                    "GRPC_PORT": str(grpc_port),
                    "JWT_PUBLIC_KEY": key,
                    "LOG_FORMAT": "json",
                    "HTTP_DRAIN_SECONDS": "0",
                    "TRUSTED_PROXIES": "127.0.0.1",  # the checker stands in for the gateway
                    "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/demo.db",
                },
            )

    url = f"http://127.0.0.1:{port}"
    process = start()
    try:
        wait_up(url, process, log)
        audit = kiban("check", url, "--log", str(log), "--grpc", f"127.0.0.1:{grpc_port}")
        assert audit.returncode == 0, audit.stdout
        assert "12 passed, 0 failed" in audit.stdout
        # Its writes are committed before the 201: killed the moment the client has it,
        # the item is there when it comes back.
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        writer = {"authorization": f"Bearer {mint(pem, 'adopter', scopes=['items:write'])}"}
        created = httpx.post(f"{url}/items", json={"name": "durable"}, headers=writer)
        assert created.status_code == 201, created.text
        process.kill()
        process.wait(timeout=10)
        process = start()
        wait_up(url, process, log)
        again = httpx.get(f"{url}/items/{created.json()['id']}")
        assert again.status_code == 200
        assert again.json()["name"] == "durable"
    finally:
        process.terminate()
        assert process.wait(timeout=20) == 0


@pytest.mark.parametrize(("security", "grpc"), [("jwt", False), ("internal_id_token", True)])
def test_manifests_validate_and_fit_the_shutdown_budget(
    tmp_path: Path, security: str, grpc: bool
) -> None:
    import kubernetes_validate

    options = ["--api-security", security, "--database", "mysql"] + (["--grpc"] if grpc else [])
    service = generate(tmp_path / "svc", *options)
    documents = {
        path.name: yaml.safe_load(path.read_text())
        for path in sorted((service / "k8s").glob("*.yaml"))
    }
    assert set(documents) == {"configmap.yaml", "deployment.yaml", "secret.yaml", "service.yaml"}
    for document in documents.values():  # raises ValidationError on the first problem
        kubernetes_validate.validate(document, "1.31", strict=True)
    deployment = documents["deployment.yaml"]["spec"]["template"]["spec"]
    container = deployment["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/liveness"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/readiness"
    config = documents["configmap.yaml"]["data"]
    budget = (
        container["lifecycle"]["preStop"]["sleep"]["seconds"]
        + float(config["HTTP_DRAIN_SECONDS"])
        + float(config["HTTP_SHUTDOWN_TIMEOUT"])
        + float(config["SHUTDOWN_CLEANUP_TIMEOUT"])
        + Server.MARGIN
    )
    assert budget < deployment["terminationGracePeriodSeconds"]
    assert deployment["securityContext"]["runAsNonRoot"] is True
    assert "USER 10001" in (service / "Dockerfile").read_text()
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    service_ports = documents["service.yaml"]["spec"]["ports"]
    served = {port["name"]: port["targetPort"] for port in service_ports}
    environment = {variable["name"]: variable["value"] for variable in container["env"]}
    if grpc:  # the gRPC port is declared everywhere the HTTP one is
        assert ports == {"http": 8000, "grpc": 8081}
        assert served == {"http": "http", "grpc": "grpc"}
        assert environment["GRPC_PORT"] == "8081"
        assert "EXPOSE 8000 8081" in (service / "Dockerfile").read_text()
    else:
        assert ports == {"http": 8000}
        assert served == {"http": "http"}


def _template_repository(tmp_path: Path) -> Path:
    repository = tmp_path / "template-repo"
    repository.mkdir()
    shutil.copy(TEMPLATE / "copier.yml", repository)
    shutil.copytree(TEMPLATE / "template", repository / "template")
    git("init", "-q", cwd=repository)
    git("add", "-A", cwd=repository)
    git("commit", "-qm", "v1", cwd=repository)
    git("tag", "v1.0.0", cwd=repository)
    return repository


def _release(repository: Path, path: str, old: str, new: str, tag: str) -> None:
    file = repository / "template" / path
    file.write_text(file.read_text().replace(old, new))
    git("commit", "-qam", tag, cwd=repository)
    git("tag", tag, cwd=repository)


def test_update_applies_template_changes_and_reports_conflicts(tmp_path: Path) -> None:
    repository = _template_repository(tmp_path)
    service = tmp_path / "svc"
    result = kiban("new", "demo-svc", "--dest", str(service), "--template", str(repository))
    assert result.returncode == 0, result.stderr
    git("init", "-q", cwd=service)
    git("add", "-A", cwd=service)
    git("commit", "-qm", "generated", cwd=service)

    _release(
        repository,
        "k8s/configmap.yaml.jinja",
        "LOG_LEVEL: info",
        'LOG_LEVEL: info\n  TRACE_SAMPLE_RATIO: "0.5"',
        "v1.1.0",
    )
    clean = kiban("update", "--dest", str(service))
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "updated cleanly" in clean.stdout
    assert 'TRACE_SAMPLE_RATIO: "0.5"' in (service / "k8s/configmap.yaml").read_text()
    git("add", "-A", cwd=service)
    git("commit", "-qm", "update", cwd=service)

    # The service and the template change the same line: reported, not silently lost.
    dockerfile = service / "Dockerfile"
    dockerfile.write_text(dockerfile.read_text().replace("EXPOSE 8000", "EXPOSE 9000"))
    git("commit", "-qam", "local port", cwd=service)
    _release(repository, "Dockerfile.jinja", "EXPOSE 8000", "EXPOSE 8080", "v1.2.0")
    conflicted = kiban("update", "--dest", str(service))
    assert conflicted.returncode == 1
    assert "Dockerfile" in conflicted.stderr
    assert "need a manual merge" in conflicted.stderr
    # Inline, and the message says truly which side is whose.
    merged = dockerfile.read_text()
    ours = merged.index("<<<<<<< before updating")
    assert ours < merged.index("EXPOSE 9000") < merged.index("=======")
    assert merged.index("=======") < merged.index("EXPOSE 8080") < merged.index(">>>>>>> after")
    assert "are the service's" in conflicted.stderr
    assert not list(service.rglob("*.rej"))


def _release_of(root: Path, version: str, tmp_path: Path) -> Path:
    """kiban's packaged template as a later release carries it: the current as history."""
    release = tmp_path / f"kiban-{version}"
    shutil.copytree(root, release, ignore=shutil.ignore_patterns("history"))
    shutil.copytree(root, release / "history" / "0.1.0", ignore=shutil.ignore_patterns("history"))
    return release


def test_a_service_made_by_one_kiban_updates_with_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No checkout and no template repository: the installed kiban carries both versions."""
    import kiban as package
    from kiban import _template

    service = tmp_path / "svc"
    _template.new("demo-svc", service, {"database": "sqlite"}, root=TEMPLATE)
    answers = (service / ".copier-answers.yml").read_text()
    assert "_src_path: ~/.cache/kiban/service-template\n" in answers  # no local path
    assert "_commit: v0.1.0" in answers
    git("init", "-q", cwd=service)
    git("add", "-A", cwd=service)
    git("commit", "-qm", "generated", cwd=service)
    readme = service / "README.md"
    readme.write_text(readme.read_text() + "\nOur own notes.\n")
    (service / "service.mk").write_text("seed:\n\techo seeding\n")  # the service's target
    git("add", "-A", cwd=service)
    git("commit", "-qm", "notes", cwd=service)

    release = _release_of(TEMPLATE, "0.2.0", tmp_path)
    configmap = release / "template/k8s/configmap.yaml.jinja"
    configmap.write_text(
        configmap.read_text().replace(
            "LOG_LEVEL: info", 'LOG_LEVEL: info\n  TRACE_SAMPLE_RATIO: "0.5"'
        )
    )
    makefile = release / "template/Makefile.jinja"  # the template's new target
    makefile.write_text(makefile.read_text() + "\nfmt: bootstrap\n\t.venv/bin/ruff format src\n")
    monkeypatch.setattr(package, "__version__", "0.2.0")
    assert _template.update(service, root=release) == []
    assert "fmt: bootstrap" in (service / "Makefile").read_text()
    assert "seed:" in (service / "service.mk").read_text()
    assert 'TRACE_SAMPLE_RATIO: "0.5"' in (service / "k8s/configmap.yaml").read_text()
    assert "Our own notes." in readme.read_text()
    answers = (service / ".copier-answers.yml").read_text()
    assert "_commit: v0.2.0" in answers
    assert "_src_path: ~/.cache/kiban/service-template\n" in answers


def test_check_fails_a_service_without_the_convention(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "plain.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "tests.apps.plain:app", "--port", str(port)],
            cwd=ROOT,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{url}/hello")
                break
            except httpx.TransportError:
                time.sleep(0.1)
        audit = kiban("check", url)
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert audit.returncode == 1
    failed = {line.split()[0] for line in audit.stdout.splitlines() if " FAIL " in line}
    rows = audit.stdout
    for check in (
        "liveness",
        "readiness",
        "errors are problem+json",
        "security declared",
        "metrics",
        "trace id propagated",
        "security headers",
    ):
        assert any(line.startswith(check) and " FAIL " in line for line in rows.splitlines()), (
            check,
            rows,
        )
    assert failed
    assert "fix:" in rows


def test_a_generated_services_settings_keep_kibans_bounds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``HTTP_PORT=70000`` is refused by name, as in kiban, not wrapped to another port."""
    import importlib

    import kiban
    from kiban import _template

    service = _template.new("bounded-svc", tmp_path / "svc", {"database": "sqlite"}, root=TEMPLATE)
    monkeypatch.syspath_prepend(str(service / "src"))
    settings = importlib.import_module("bounded_svc.settings")
    monkeypatch.setenv("JWT_PUBLIC_KEY", "unused here")
    monkeypatch.setenv("HTTP_PORT", "70000")
    monkeypatch.setenv("LOG_LEVEL", "INFO")
    with pytest.raises(kiban.ConfigError) as caught:
        kiban.load(settings.ServiceSettings)
    assert "  HTTP_PORT: " in str(caught.value)
    assert "LOG_LEVEL" not in str(caught.value)
