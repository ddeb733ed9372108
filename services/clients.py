"""Generate the typed clients of the sample services: HTTP from OpenAPI, gRPC from protos.

``python -m services.clients`` regenerates ``services/orders/members_client`` with
openapi-python-client and the gRPC stubs next to each ``.proto`` (``PROTOS``) with
grpcio-tools; tests fail when what is committed drifts from the API or the proto.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = {"members": ROOT / "services" / "orders" / "members_client"}
#: The protos whose stubs are committed beside them (paths from the repository root).
PROTOS = ("services/members/rpc/members.proto", "tests/apps/rpc/probe.proto")


def generate_stubs(proto: str, output: Path) -> list[Path]:
    """Write ``proto``'s messages, typing stubs and gRPC stubs under ``output``."""
    from grpc_tools import protoc  # dev dependency

    arguments = [
        "protoc",
        f"-I{ROOT}",
        f"--python_out={output}",
        f"--pyi_out={output}",
        f"--grpc_python_out={output}",
        str(ROOT / proto),
    ]
    if protoc.main(arguments) != 0:
        raise RuntimeError(f"protoc failed on {proto}")
    stem = proto.removesuffix(".proto")
    return [output / f"{stem}{suffix}" for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")]


def openapi(service: str) -> dict[str, object]:
    if service != "members":
        raise ValueError(service)
    from services.members.app import MembersSettings, create_app

    app = create_app(MembersSettings(database_url="sqlite+aiosqlite:///:memory:"))
    return app.openapi()


def generate(service: str, target: Path) -> None:
    """Write the typed client of ``service`` to ``target`` (replaced whole)."""
    with tempfile.TemporaryDirectory() as work:
        spec = Path(work) / "openapi.json"
        spec.write_text(json.dumps(openapi(service), indent=2, sort_keys=True))
        output = Path(work) / "client"
        env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        }
        subprocess.run(
            [
                Path(sys.executable).parent / "openapi-python-client",
                "generate",
                "--path",
                str(spec),
                "--meta",
                "none",
                "--output-path",
                str(output),
            ],
            check=True,
            env=env,
            capture_output=True,
        )
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(output, target, ignore=shutil.ignore_patterns(".ruff_cache"))


def main() -> int:
    for service, target in CLIENTS.items():
        generate(service, target)
        print(f"generated {target.relative_to(ROOT)}")
    for proto in PROTOS:
        for path in generate_stubs(proto, ROOT):
            print(f"generated {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
