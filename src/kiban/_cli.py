"""The ``kiban`` command."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from kiban._config import ConfigError

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    from kiban import __version__

    parser = argparse.ArgumentParser(prog="kiban", description="The kiban service toolkit.")
    parser.add_argument("--version", action="version", version=f"kiban {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="serve a kiban service: kiban run module:app")
    run_parser.add_argument("target", help="module:attribute of the FastAPI app or kiban.Service")
    run_parser.add_argument("--host", help="listen address (default: HTTP_HOST)")
    run_parser.add_argument("--port", type=int, help="listen port (default: HTTP_PORT)")
    dev_parser = commands.add_parser(
        "dev", help="run the services of kiban.toml beside the local dashboard"
    )
    dev_parser.add_argument("--config", type=Path, default=Path("kiban.toml"))
    dev_parser.add_argument("--host", help="the dashboard's address (default: 127.0.0.1)")
    dev_parser.add_argument("--port", type=int, help="the dashboard's port (default: 8000)")
    dev_parser.add_argument(
        "--allow-remote", action="store_true", help="let the dashboard listen off loopback"
    )
    token_parser = commands.add_parser(
        "token", help="mint a development token: kiban token internal --sub u-42"
    )
    token_parser.add_argument("kind", choices=["internal", "jwt"])
    token_parser.add_argument("--sub", required=True, help="the subject (user or client id)")
    token_parser.add_argument("--scope", action="append", default=[], help="repeatable")
    token_parser.add_argument("--key", help="private key PEM (default: the sample dev key)")
    token_parser.add_argument("--issuer", help="default: the sample system's issuer")
    token_parser.add_argument("--audience")
    token_parser.add_argument("--ttl", type=float, default=3600.0, help="seconds")
    keys_parser = commands.add_parser(
        "keys", help="make a development key pair: kiban keys .dev (EdDSA, PEM)"
    )
    keys_parser.add_argument("folder", type=Path, nargs="?", default=Path(".dev"))
    check_parser = commands.add_parser("check", help="audit a running service: kiban check URL")
    check_parser.add_argument("url")
    check_parser.add_argument("--log", type=Path, help="a file of the service's log output")
    check_parser.add_argument("--json", action="store_true", help="one JSON document, for CI")
    check_parser.add_argument(
        "--grpc", metavar="HOST:PORT", help="audit the service's gRPC server too"
    )
    new_parser = commands.add_parser("new", help="make a new service from the template")
    new_parser.add_argument("name", help="the service name, e.g. billing")
    new_parser.add_argument("--dest", type=Path, help="default: ./NAME")
    new_parser.add_argument("--database", choices=["postgresql", "mysql", "sqlite"])
    new_parser.add_argument("--api-security", choices=["jwt", "internal_id_token"])
    new_parser.add_argument(
        "--grpc",
        action="store_true",
        default=None,
        help="serve the API over gRPC too: a proto, its servicer and tests",
    )
    new_parser.add_argument(
        "--kiban-source",
        help="how the service depends on kiban (default: this kiban's minor series)",
    )
    new_parser.add_argument(
        "--find-links", help="a folder of wheels (or URL) where the service's uv finds kiban"
    )
    new_parser.add_argument("--template", help="a copier template (default: kiban's own)")
    new_parser.add_argument(
        "--interactive", action="store_true", help="ask every question instead of taking defaults"
    )
    update_parser = commands.add_parser("update", help="bring a service up to the template")
    update_parser.add_argument("--dest", type=Path, default=Path("."))
    update_parser.add_argument("--vcs-ref", help="template version (default: the newest)")
    args = parser.parse_args(argv)
    if args.command == "new":
        return _new(args)
    if args.command == "update":
        from kiban import _template as template

        if not (args.dest / ".copier-answers.yml").exists():
            print(f"kiban: {args.dest} was not made by kiban new", file=sys.stderr)
            return 2
        try:
            return template.report(template.update(args.dest, args.vcs_ref))
        except ConfigError as exc:
            print(f"kiban: {exc}", file=sys.stderr)
            return 2
    if args.command == "token":
        return _token(args)
    if args.command == "dev":
        return _dev(args)
    if args.command == "keys":
        try:
            signing, public = dev_keys(args.folder)
        except (FileExistsError, ConfigError) as exc:
            print(f"kiban: {exc}", file=sys.stderr)
            return 2
        print(f"signing key {signing} (keep it out of git), public key {public}")
        return 0
    if args.command == "check":
        return _check(args)
    if args.command == "run":
        from kiban._server import run

        # Flags win over the environment: they are what the operator typed just now.
        if args.host is not None:
            os.environ["HTTP_HOST"] = args.host
        if args.port is not None:
            os.environ["HTTP_PORT"] = str(args.port)
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # as ``python -m`` would: the app is local code
        try:
            return run(args.target)
        except ConfigError as exc:
            print(f"kiban: {exc}", file=sys.stderr)
            return 2
    return 0


def _dev(args: argparse.Namespace) -> int:
    """``kiban dev``: 2 when kiban.toml (or a flag) is wrong, naming every mistake."""
    import dataclasses

    from kiban import dev

    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        config = dev.load(args.config)
        config = dataclasses.replace(
            config,
            host=config.host if args.host is None else args.host,
            port=config.port if args.port is None else args.port,
            allow_remote=config.allow_remote or args.allow_remote,
        )
        return dev.run(config)
    except ConfigError as exc:
        print(f"kiban: {exc}", file=sys.stderr)
        return 2


def _check(args: argparse.Namespace) -> int:
    """``kiban check``: 0 conformant, 1 findings, 2 cannot audit (unreachable, no log)."""
    import json

    from kiban._check import Unreachable, audit, audit_grpc, render

    if args.log is not None and not args.log.is_file():
        print(f"kiban: no log file at {args.log}", file=sys.stderr)
        return 2
    try:
        rows = audit(args.url, args.log)
        if args.grpc:
            from kiban import _extras

            _extras.require("grpc_health", "grpc", "kiban check --grpc")
            rows += audit_grpc(args.grpc)
    except (Unreachable, ConfigError) as exc:
        if args.json:
            print(json.dumps({"url": args.url, "reachable": False, "error": str(exc)}))
        print(f"kiban: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 2
    failed = sum(not row.ok for row in rows)
    if args.json:
        document = {
            "url": args.url,
            "reachable": True,
            "passed": len(rows) - failed,
            "failed": failed,
            "checks": [
                {"check": row.check, "ok": row.ok, "detail": row.detail, "fix": row.fix}
                for row in rows
            ],
        }
        print(json.dumps(document, indent=2))
    else:
        print(render(rows))
    return 1 if failed else 0


#: Modules a service package must not shadow: Python's own, and what a service imports.
_SHADOWED = frozenset(
    {
        *sys.stdlib_module_names,
        "kiban",
        "tests",
        "test",
        "app",
        "fastapi",
        "starlette",
        "pydantic",
        "sqlalchemy",
        "alembic",
        "httpx",
        "uvicorn",
        "structlog",
        "jwt",
        "redis",
    }
)


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a service (a package, a Kubernetes name), or None."""
    import keyword

    if not re.fullmatch(r"[a-z][a-z0-9-]{0,38}[a-z0-9]", name):
        return (
            f"{name!r} is not a service name: 2 to 40 lowercase letters, digits and dashes, "
            "starting with a letter and not ending with a dash"
        )
    package = name.replace("-", "_")
    if keyword.iskeyword(package) or keyword.issoftkeyword(package):
        return f"{name!r} is a Python keyword: its package could not be imported"
    if package in _SHADOWED:
        return f"{name!r} would shadow the module {package!r}: pick another name"
    return None


def _new(args: argparse.Namespace) -> int:
    """``kiban new``: check everything first, then write the folder whole or not at all."""
    import shutil

    from kiban import _template as template

    problem = name_problem(args.name)
    if problem is not None:
        print(f"kiban: {problem}", file=sys.stderr)
        return 2
    destination: Path = args.dest or Path(args.name)
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        print(
            f"kiban: {destination} exists and is not empty; choose another --dest", file=sys.stderr
        )
        return 2
    if args.kiban_source is None and args.template is None:
        args.kiban_source = template.dependency()
    created = not destination.exists()
    try:
        template.new(
            args.name,
            destination,
            {
                "database": args.database,
                "api_security": args.api_security,
                "grpc": args.grpc,
                "kiban_source": args.kiban_source,
                "kiban_find_links": args.find_links,
            },
            args.template,
            interactive=args.interactive,
        )
    except (Exception, KeyboardInterrupt) as exc:  # never leave half a service behind
        if created:
            shutil.rmtree(destination, ignore_errors=True)
        else:
            for child in destination.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        print(f"kiban: {exc}", file=sys.stderr)
        return 2
    try:
        dev_keys(destination / ".dev")
    except ConfigError as exc:  # no cryptography: the service still works with its own keys
        print(f"kiban: no development keys made: {exc}", file=sys.stderr)
    print(f"created {destination}: cd {destination} && make test && make run")
    return 0


def dev_keys(folder: Path) -> tuple[Path, Path]:
    """An Ed25519 key pair for development: ``signing-key.pem`` (0600), ``public-key.pem``."""
    from kiban import _extras

    _extras.require("cryptography", "jwt", "kiban keys")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    signing, public = folder / "signing-key.pem", folder / "public-key.pem"
    if signing.exists() or public.exists():
        raise FileExistsError(f"{folder} already holds keys; remove them to make new ones")
    folder.mkdir(parents=True, exist_ok=True)
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    descriptor = os.open(signing, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as output:
        output.write(private_pem)
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return signing, public


DEV_KEYS = {
    "internal": ("services/devkeys/gateway-dev.pem", "kiban-dev-gateway"),
    "jwt": ("services/devkeys/auth-dev.pem", "kiban-dev-auth"),
}


def _token(args: argparse.Namespace) -> int:
    from kiban.security._tokens import mint

    default_key, default_issuer = DEV_KEYS[args.kind]
    issuer: str | None = default_issuer
    if Path(".dev/signing-key.pem").exists():  # a service made by kiban new
        default_key, issuer = ".dev/signing-key.pem", None
    key_path = Path(args.key or default_key)
    if not key_path.exists():
        print(f"kiban: no key at {key_path}; pass --key", file=sys.stderr)
        return 2
    print(
        mint(
            key_path.read_bytes(),
            args.sub,
            issuer=args.issuer or issuer,
            audience=args.audience,
            scopes=args.scope,
            ttl=args.ttl,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
