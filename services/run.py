"""``make run``: the sample system on embedded defaults, beside kiban dev's dashboard.

It is ``kiban dev`` on this repository's ``kiban.toml``, plus the lines that say how to
call the services once they are ready.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from kiban import dev

ROOT = Path(__file__).resolve().parent.parent


def dev_token(kind: str, subject: str, *scopes: str) -> str:
    from kiban._cli import DEV_KEYS
    from kiban.security._tokens import mint

    key, issuer = DEV_KEYS[kind]
    return mint((ROOT / key).read_bytes(), subject, issuer=issuer, scopes=scopes, ttl=8 * 3600)


def banner(config: dev.DevConfig) -> None:
    """Once every service is ready: the development tokens and what to try."""
    ports = {spec.name: spec.port for spec in config.services}
    dashboard = config.url
    members = f"http://127.0.0.1:{ports['members']}"
    orders = f"http://127.0.0.1:{ports['orders']}"
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    members_grpc = os.environ.get("GRPC_PORT", "9001")
    user = dev_token("internal", "1")
    admin = dev_token("jwt", "ops", "members:admin", "members:read")
    print(
        f"""
kiban sample system is up (Ctrl+C stops it):
  dashboard {dashboard}   services, requests, traces, logs and the map
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
     # the dashboard shows its trace: {dashboard}/#/trace/{trace}
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


def main() -> int:
    (ROOT / ".run").mkdir(exist_ok=True)
    return dev.run(ROOT / "kiban.toml", on_ready=banner)


if __name__ == "__main__":
    sys.exit(main())
