"""``kiban dev``: start the services declared in ``kiban.toml`` and the dashboard.

The dashboard comes up first (its URL is the first line printed), then each service as
its own process with ``kiban run``, told by the environment to export traces, metrics
and logs to the dashboard over OTLP/HTTP: the same exporters, and the same settings,
that would point it at a production collector. While they run, ``kiban dev`` polls
their liveness and readiness for the services page and can restart one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import re
import signal
import sys
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from kiban._config import ConfigError

__all__ = ["DevConfig", "ServiceSpec", "check", "load", "run"]

_NAME = re.compile(r"^[a-z][a-z0-9-]*$")
_REFERENCE = re.compile(r"\{([a-z][a-z0-9-]*)\.(port|url)\}")


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """One service ``kiban dev`` runs: ``app`` (``module:attr``) or a ``command``."""

    name: str
    port: int
    app: str | None = None
    command: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        if self.command:
            return list(self.command)
        return [sys.executable, "-m", "kiban", "run", str(self.app)]


@dataclass(frozen=True, slots=True)
class DevConfig:
    """``kiban.toml``'s ``[dev]`` table: the dashboard's address and the services."""

    root: Path
    services: tuple[ServiceSpec, ...]
    host: str = "127.0.0.1"
    port: int = 8000
    env: Mapping[str, str] = field(default_factory=dict)
    allow_remote: bool = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def _port(value: Any, where: str, errors: list[str]) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 65536:
        errors.append(f"{where}: a port from 1 to 65535, not {value!r}")
        return 0
    return value


def _env(value: Any, where: str, errors: list[str]) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        errors.append(f"{where}: a table of NAME = value")
        return {}
    return {
        key: str(item).lower() if isinstance(item, bool) else str(item)
        for key, item in value.items()
    }


def load(path: Path | str = "kiban.toml", environ: Mapping[str, str] | None = None) -> DevConfig:
    """Read ``path``'s ``[dev]`` table; every mistake in it is named in one ``ConfigError``.

    The environment overrides ports: ``KIBAN_DEV_PORT`` the dashboard's, ``NAME_PORT``
    (upper case, ``-`` as ``_``) a service's, so two checkouts can run side by side.
    """
    environ = os.environ if environ is None else environ
    path = Path(path)
    try:
        document = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no {path}: kiban dev runs the services it declares") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path} is not TOML: {error}") from None
    dev = document.get("dev")
    errors: list[str] = []
    if not isinstance(dev, dict):
        raise ConfigError(f"{path} has no [dev] table")
    port = _port(environ.get("KIBAN_DEV_PORT", dev.get("port", 8000)), "dev.port", errors)
    host = str(dev.get("host", "127.0.0.1"))
    services: list[ServiceSpec] = []
    raw = dev.get("services")
    if not isinstance(raw, list) or not raw:
        errors.append("dev.services: at least one [[dev.services]] with name, app and port")
        raw = []
    for index, entry in enumerate(raw):
        where = f"dev.services[{index}]"
        if not isinstance(entry, dict):
            errors.append(f"{where}: a table")
            continue
        name = entry.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            errors.append(f"{where}.name: lower-case letters, digits and -, not {name!r}")
            name = f"service-{index}"
        if any(spec.name == name for spec in services):
            errors.append(f"{where}.name: {name} is declared twice")
        override = environ.get(name.upper().replace("-", "_") + "_PORT")
        service_port = _port(override or entry.get("port"), f"{where}.port", errors)
        app, command = entry.get("app"), entry.get("command", ())
        if isinstance(command, str):
            command = command.split()
        if (app is None) == (not command):
            errors.append(f'{where}: either app = "module:attribute" or command = [...]')
        elif app is not None and (not isinstance(app, str) or ":" not in app):
            errors.append(f"{where}.app: module:attribute, not {app!r}")
        services.append(
            ServiceSpec(
                name=name,
                port=service_port,
                app=app if isinstance(app, str) else None,
                command=tuple(str(part) for part in command),
                env=_env(entry.get("env"), f"{where}.env", errors),
            )
        )
    config = DevConfig(
        root=path.resolve().parent,
        services=tuple(services),
        host=host,
        port=port,
        env=_env(dev.get("env"), "dev.env", errors),
        allow_remote=bool(dev.get("allow_remote", False)),
    )
    errors += _check_host(config)
    for spec in services:
        for value in spec.env.values():
            for reference, _ in _REFERENCE.findall(value):
                if reference != "dashboard" and all(each.name != reference for each in services):
                    errors.append(f"dev.services {spec.name}: {{{reference}...}} names no service")
    if errors:
        raise ConfigError(f"{path}: " + "; ".join(errors))
    return config


def _check_host(config: DevConfig) -> list[str]:
    if config.host == "localhost":
        return []
    try:
        loopback = ipaddress.ip_address(config.host).is_loopback
    except ValueError:
        return [f"dev.host: an IP address or localhost, not {config.host!r}"]
    if loopback or config.allow_remote:
        return []
    return [
        f"dev.host {config.host} is not loopback: the dashboard shows every service's logs "
        "and can restart them; set allow_remote = true (or --allow-remote) to mean it"
    ]


def check(config: DevConfig) -> DevConfig:
    """``config`` if its dashboard address is allowed (loopback, or ``allow_remote``)."""
    errors = _check_host(config)
    if errors:
        raise ConfigError("; ".join(errors))
    return config


def _expand(value: str, config: DevConfig) -> str:
    by_name = {spec.name: spec for spec in config.services}

    def replace(match: re.Match[str]) -> str:
        name, what = match.groups()
        if name == "dashboard":
            return config.url if what == "url" else str(config.port)
        spec = by_name[name]
        return spec.url if what == "url" else str(spec.port)

    return _REFERENCE.sub(replace, value)


def service_env(spec: ServiceSpec, config: DevConfig, base: Mapping[str, str]) -> dict[str, str]:
    """A service's environment.

    From weakest to strongest: kiban dev's defaults, the file's ``[dev.env]``, the
    service's ``env``, the shell's environment (what the developer typed just now), and
    what kiban dev must decide: the port, and OTLP/HTTP export of traces, metrics and
    logs to the dashboard, in short intervals.
    """
    env = {"HTTP_DRAIN_SECONDS": "0", "SERVICE_NAME": spec.name}
    for key, value in {**config.env, **spec.env}.items():
        env[key] = _expand(value, config)
    env.update(base)
    env.update(
        {
            "HTTP_PORT": str(spec.port),
            "OTLP_ENDPOINT": f"http://127.0.0.1:{config.port}",
            "OTLP_PROTOCOL": "http/protobuf",
            "OTLP_LOGS": "true",
            "METRICS_EXPORT_INTERVAL": "2",
            "TRACE_EXPORT_DELAY": "0.5",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


class Runner:
    """The services' processes, their health, and restarts, on one event loop."""

    def __init__(self, config: DevConfig, store: Any, base_env: Mapping[str, str]) -> None:
        self.config = config
        self.store = store
        self.base_env = dict(base_env)
        self.processes: dict[str, asyncio.subprocess.Process] = {}
        self.specs = {spec.name: spec for spec in config.services}
        for spec in config.services:
            state = store.service(spec.name)
            state.url, state.managed = spec.url, True

    async def start(self, name: str) -> None:
        spec = self.specs[name]
        self.processes[name] = await asyncio.create_subprocess_exec(
            *spec.argv(), cwd=self.config.root, env=service_env(spec, self.config, self.base_env)
        )
        state = self.store.service(name)
        state.started_at, state.running = time.time(), True
        state.liveness, state.readiness = "starting", {}
        self.store.changed()

    async def stop(self, name: str, grace: float = 20) -> None:
        process = self.processes.get(name)
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), grace)
        except TimeoutError:
            process.kill()
            await process.wait()

    async def restart(self, name: str) -> bool:
        if name not in self.specs:
            return False
        await self.stop(name)
        await self.start(name)
        self.store.service(name).restarts += 1
        return True

    async def stop_all(self) -> None:
        await asyncio.gather(*(self.stop(name) for name in self.processes))

    async def wait_ready(self, stopping: asyncio.Event, within: float = 60) -> list[str]:
        """Wait until every service is ready; the names of those that are not (or exited)."""
        import httpx

        deadline = time.monotonic() + within
        waiting = set(self.specs)
        async with httpx.AsyncClient(timeout=1) as client:
            while waiting and time.monotonic() < deadline and not stopping.is_set():
                for name in sorted(waiting):
                    process = self.processes[name]
                    if process.returncode is not None:
                        return [name]
                    with contextlib.suppress(httpx.HTTPError):
                        response = await client.get(f"{self.specs[name].url}/health/readiness")
                        if response.status_code == 200:
                            waiting.discard(name)
                await asyncio.sleep(0.2)
        return sorted(waiting)

    async def watch(self, interval: float = 2.0) -> None:
        """Poll each service's liveness and readiness for the services page, forever."""
        import httpx

        async with httpx.AsyncClient(timeout=2) as client:
            while True:
                await asyncio.gather(*(self._poll(client, name) for name in self.specs))
                await asyncio.sleep(interval)

    async def _poll(self, client: Any, name: str) -> None:
        import httpx

        state = self.store.service(name)
        process = self.processes.get(name)
        running = process is not None and process.returncode is None
        before = (state.running, state.liveness, state.readiness)
        state.running = running
        if not running:
            state.liveness, state.readiness = "stopped", {}
        else:
            url = self.specs[name].url
            try:
                live = await client.get(f"{url}/health/liveness")
                state.liveness = "ok" if live.status_code == 200 else f"fail ({live.status_code})"
                ready = await client.get(f"{url}/health/readiness")
                body = ready.json() if "json" in ready.headers.get("content-type", "") else {}
                state.readiness = body if isinstance(body, dict) else {}
                state.readiness.setdefault("status", "ok" if ready.status_code == 200 else "fail")
            except (httpx.HTTPError, ValueError):
                if state.liveness != "starting":
                    state.liveness, state.readiness = "unreachable", {}
        if (state.running, state.liveness, state.readiness) != before:
            self.store.changed()


class _DashboardServer(uvicorn.Server):
    """uvicorn's server whose SIGINT/SIGTERM stops the services first, then itself."""

    def __init__(self, config: uvicorn.Config, stopping: asyncio.Event) -> None:
        super().__init__(config)
        self.stopping = stopping
        self.loop = asyncio.get_running_loop()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """A signal handler: wake ``serve``, which stops the services, then this server."""
        self.loop.call_soon_threadsafe(self.stopping.set)


def _print(line: str) -> None:
    print(line, flush=True)


async def serve(
    config: DevConfig,
    on_ready: Callable[[DevConfig], None] | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    """Run the dashboard and the services until SIGINT or SIGTERM; the exit code."""
    from kiban._dashboard._store import Store
    from kiban._dashboard._web import create_app

    store = Store()
    runner = Runner(config, store, os.environ if environ is None else environ)
    stopping = asyncio.Event()
    server = _DashboardServer(
        uvicorn.Config(
            create_app(store, runner.restart),
            host=config.host,
            port=config.port,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=1,
        ),
        stopping,
    )
    serving = asyncio.create_task(server.serve())
    while not server.started:
        if serving.done():
            _print(f"kiban dev: the dashboard cannot listen on {config.url}")
            return 2
        await asyncio.sleep(0.02)
    _print(f"kiban dev: dashboard {config.url}")
    watching: asyncio.Task[None] | None = None
    try:
        for spec in config.services:
            await runner.start(spec.name)
            _print(f"kiban dev: {spec.name} {spec.url}")
        not_ready = await runner.wait_ready(stopping)
        exited = {
            name: process.returncode
            for name, process in runner.processes.items()
            if name in not_ready and process.returncode is not None
        }
        if exited:  # a start-up failure: its output above says why; stop the others
            for name, status in exited.items():
                _print(f"kiban dev: {name} exited with status {status} before it was ready")
            return 1
        if not_ready and not stopping.is_set():  # still starting: the page will show it
            _print(f"kiban dev: not ready yet: {', '.join(not_ready)}")
        elif on_ready is not None and not stopping.is_set():
            on_ready(config)
        watching = asyncio.create_task(runner.watch())
        await stopping.wait()
    finally:
        if watching is not None:
            watching.cancel()
        await runner.stop_all()
        server.should_exit = True
        await serving
    return 0


def run(
    config: DevConfig | Path | str = "kiban.toml",
    on_ready: Callable[[DevConfig], None] | None = None,
) -> int:
    """``kiban dev``: the dashboard and the services of ``config`` until Ctrl+C."""
    from kiban._extras import require

    require("opentelemetry.proto", "otlp", "kiban dev")
    config = check(config) if isinstance(config, DevConfig) else load(config)
    try:
        return asyncio.run(serve(config, on_ready))
    except KeyboardInterrupt:
        return 0
