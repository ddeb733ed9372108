"""Generate the typed clients of the sample services from their OpenAPI documents.

``python -m services.clients`` regenerates ``services/orders/members_client`` with
openapi-python-client; a test fails when the committed client drifts from the API.
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
