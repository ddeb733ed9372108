"""``make run``: start the sample system on embedded defaults and show how to call it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
SERVICES = {
    "members": ("services.members.app:create_app", int(os.environ.get("MEMBERS_PORT", "8001"))),
    "orders": ("services.orders.app:create_app", int(os.environ.get("ORDERS_PORT", "8002"))),
}


def start(name: str, target: str, port: int) -> subprocess.Popen[bytes]:
    env = {
        "HTTP_DRAIN_SECONDS": "0",
        # The gateway (you, with curl) and the services call each other on loopback: trust
        # it, so one uid and one user IP show across both services' logs.
        "TRUSTED_PROXIES": "127.0.0.1,::1",
        **os.environ,
        "HTTP_PORT": str(port),
        "MEMBERS_URL": f"http://127.0.0.1:{SERVICES['members'][1]}",
        "PYTHONUNBUFFERED": "1",
    }
    return subprocess.Popen([sys.executable, "-m", "kiban", "run", target], cwd=ROOT, env=env)


def dev_token(kind: str, subject: str, *scopes: str) -> str:
    from kiban._cli import DEV_KEYS
    from kiban.security._tokens import mint

    key, issuer = DEV_KEYS[kind]
    return mint((ROOT / key).read_bytes(), subject, issuer=issuer, scopes=scopes, ttl=8 * 3600)


def wait_ready(port: int, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"service on port {port} exited with {process.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/readiness").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"service on port {port} was not ready within {timeout}s")


def interrupt(signum: int, frame: object) -> None:
    """SIGTERM stops the system as Ctrl+C does, so no service is left running."""
    raise KeyboardInterrupt


def main() -> int:
    (ROOT / ".run").mkdir(exist_ok=True)
    signal.signal(signal.SIGTERM, interrupt)
    processes: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, (target, port) in SERVICES.items():
            processes[name] = start(name, target, port)
        for name, (_, port) in SERVICES.items():
            wait_ready(port, processes[name])
        members = f"http://127.0.0.1:{SERVICES['members'][1]}"
        orders = f"http://127.0.0.1:{SERVICES['orders'][1]}"
        trace = "4bf92f3577b34da6a3ce929d0e0e4736"
        members_grpc = os.environ.get("GRPC_PORT", "9001")
        user = dev_token("internal", "1")
        admin = dev_token("jwt", "ops", "members:admin", "members:read")
        print(
            f"""
kiban sample system is up (Ctrl+C stops it):
  members  {members}   docs {members}/docs   readiness {members}/health/readiness
  orders   {orders}   docs {orders}/docs   metrics {orders}/metrics
  members gRPC  127.0.0.1:{members_grpc}   members.v1.Members, health and reflection
     (MEMBERS_GRPC=127.0.0.1:{members_grpc} make run: orders calls members over gRPC)

Development tokens (signed with services/devkeys; mint more with `kiban token`):
  USER={user}    # the gateway's identity token for member 1
  ADMIN={admin}    # a JWT with members:admin

Try:
  curl -s -X POST {members}/members -H 'content-type: application/json' \\
       -d '{{"email": "ada@example.com", "name": "Ada"}}'
  curl -s -X POST {orders}/orders -H 'content-type: application/json' \\
       -H "x-internal-id-token: $USER" -H 'x-trace-id: {trace}' \\
       -d '{{"member_id": 1, "item": "tea", "quantity": 2}}'
     # both services' access lines below show trace_id {trace} and uid 1
  curl -s {members}/members/me -H "x-internal-id-token: $USER"
  curl -s -X PATCH {members}/members/1 -H "authorization: Bearer $ADMIN" \\
       -H 'content-type: application/json' -d '{{"name": "Ada Lovelace"}}'
  curl -s '{members}/members?limit=10' -H 'x-api-key: dev-partner-key'
  curl -s {members}/members/1          # a problem+json 401
  grpcurl -plaintext -H "authorization: Bearer $ADMIN" -d '{{"id": 1}}' \\
       127.0.0.1:{members_grpc} members.v1.Members/GetMember
""",
            flush=True,
        )
        while all(process.poll() is None for process in processes.values()):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
