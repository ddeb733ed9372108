"""Serve one bench variant: ``python -m bench.serve VARIANT PORT [WORKERS]``."""

from __future__ import annotations

import sys

import uvicorn

from bench.apps import load


def main() -> None:
    variant, port = sys.argv[1], int(sys.argv[2])
    workers = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    if workers > 1:
        uvicorn.run(
            f"bench.serve:{variant}_factory",
            factory=True,
            host="127.0.0.1",
            port=port,
            workers=workers,
            http="httptools",
            loop="uvloop",
            access_log=False,
            log_level="warning",
        )
        return
    app = load(variant)
    if variant in ("kiban", "members"):
        import kiban

        kiban.run(app, kiban.Service.of(app).settings.model_copy(update={"http_port": port}))
        return
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        http="httptools",
        loop="uvloop",
        access_log=False,
        log_level="warning",
        server_header=False,
    )


def kiban_factory() -> object:
    return load("kiban")


def fastapi_factory() -> object:
    return load("fastapi")


if __name__ == "__main__":
    main()
