"""Serve one bench variant: ``python -m bench.serve VARIANT PORT [WORKERS] [SERVER]``.

SERVER is ``uvicorn`` (the default, with uvloop and httptools; kiban variants through
``kiban.run``, its own server settings) or ``granian`` (its ASGI interface, uvloop),
measured side by side by ``make bench``.
"""

from __future__ import annotations

import sys

import uvicorn

from bench.apps import load


def main() -> None:
    variant, port = sys.argv[1], int(sys.argv[2])
    workers = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    server = sys.argv[4] if len(sys.argv) > 4 else "uvicorn"
    if server == "granian":
        from granian import Granian
        from granian.constants import Interfaces, Loops

        Granian(
            f"bench.serve:{variant}_factory",
            address="127.0.0.1",
            port=port,
            interface=Interfaces.ASGI,
            workers=workers,
            loop=Loops.uvloop,
            log_enabled=False,
            factory=True,
        ).serve()
        return
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
    if variant in ("kiban", "members", "members-pg"):
        on_kiban(app, port)
        return
    on_uvicorn(app, port)


def on_uvicorn(app: object, port: int) -> None:
    """Serve a bare app as the bench's peers are served: uvicorn, httptools, uvloop."""
    uvicorn.run(
        app,  # type: ignore[arg-type]
        host="127.0.0.1",
        port=port,
        http="httptools",
        loop="uvloop",
        access_log=False,
        log_level="warning",
        server_header=False,
    )


def on_kiban(app: object, port: int) -> int:
    """Serve a kiban app through ``kiban.run``, with its own settings but the port."""
    import kiban

    return kiban.run(app, kiban.Service.of(app).settings.model_copy(update={"http_port": port}))


def kiban_factory() -> object:
    return load("kiban")


def fastapi_factory() -> object:
    return load("fastapi")


if __name__ == "__main__":
    main()
