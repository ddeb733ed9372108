"""Shared fixtures: captured log output, real servers on loopback, real processes."""

from __future__ import annotations

import functools
import gc
import io
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from kiban import _log as log

# kiban's plugin (``pytest_plugins`` below) is imported here first, for ``Lines``: marked
# for pytest's assertion rewriting before that import, as its plugins are.
pytest.register_assert_rewrite("kiban.testing")
from kiban.testing import CapturedLogs  # noqa: E402

#: kiban's own pytest plugin, used here as a service's suite would use it.
pytest_plugins = ["kiban.testing"]

# Services made in tests serve gRPC on a free port, never on a fixed one another
# process (or a developer's `make run`) may hold.
os.environ.setdefault("GRPC_PORT", "0")
ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() == "true"

POSTGRES = ("127.0.0.1", 5432)
MARIADB = ("127.0.0.1", 3306)
REDIS = ("127.0.0.1", 6379)


DEV_KEYS = ROOT / "services" / "devkeys"

#: Every credential the suite uses; none may appear in any log the suite produced.
SECRETS: set[str] = {
    "dev-partner-key",
    "debug-key",
    "k-123",
    "correct horse",
    "s3cret",
    "hunter2",
    "pw-secret",
    "secret-pw",
    "pw-42",
    "good-token",
    "k-999",
    "issued-secret",
}
#: Every log the suite produced: the in-process log file and each process's output.
LOGS: list[Path] = []


def secret(value: str) -> str:
    """Register a credential the suite uses, for the final scan of all logs."""
    SECRETS.add(value)
    return value


API_KEY = {"x-api-key": "dev-partner-key"}


def token(kind: str, subject: str, *scopes: str, **options: Any) -> str:
    """A token signed with the sample system's development keys."""
    from kiban._cli import DEV_KEYS as KEYS
    from kiban.security._tokens import mint

    key, issuer = KEYS[kind]
    options.setdefault("issuer", issuer)
    return secret(mint((ROOT / key).read_bytes(), subject, scopes=scopes, **options))


def bearer(subject: str, *scopes: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token('jwt', subject, *scopes)}"}


def identity(subject: str) -> dict[str, str]:
    return {"x-internal-id-token": token("internal", subject)}


class Lines(CapturedLogs):
    """What kiban wrote, one parsed JSON object a line (kiban.testing's, and more)."""

    def all(self) -> list[dict[str, Any]]:
        return self.lines()

    def app(self) -> list[dict[str, Any]]:
        return [line for line in self.all() if line.get("log") != "access"]

    def text(self) -> str:
        log.sink.flush()
        return self.stream.getvalue().decode()


@pytest.fixture(scope="session")
def session_log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One file that receives every line kiban writes in the test process."""
    path = tmp_path_factory.mktemp("logs") / "in-process.log"
    LOGS.append(path)
    with path.open("ab") as stream:
        yield stream


@pytest.fixture(autouse=True)
def _keep_logs(session_log: Any) -> Iterator[None]:
    log.configure("info", "json", stream=session_log)
    yield
    log.configure("info", "json", stream=session_log)


@pytest.fixture
def lines(session_log: Any) -> Iterator[Lines]:
    """Send kiban's log output (JSON) to memory for the test; keep a copy for the scan."""
    stream = io.BytesIO()
    log.configure("info", "json", stream=stream, service="test")
    yield Lines(stream)
    log.sink.flush()
    session_log.write(stream.getvalue())
    log.configure("info", "json", stream=session_log)


#: A still instant a second into its minute, hour and day: one second past midnight.
STILL = 86_400.0 * 20_000 + 1.0


@pytest.fixture
def still_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-memory rate limits counted at one still instant, a second into every window.

    A sliding window counter rounds the previous window's share down, so a burst that
    straddles a window's end is admitted once more; on the wall clock a test asserting
    an exact count would fail whenever its burst crossed a minute.
    """
    from kiban import _ratelimit

    monkeypatch.setattr(
        _ratelimit, "LocalCounter", functools.partial(_ratelimit.LocalCounter, clock=lambda: STILL)
    )


def _reachable(address: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(address, timeout=1):
            return True
    except OSError:
        return False


def require(address: tuple[str, int], what: str) -> None:
    """Skip when a real server is missing on a developer machine; fail under CI."""
    if _reachable(address):
        return
    message = f"{what} is not running on {address[0]}:{address[1]}"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def read_until(stream: Any, marker: str, timeout: float = 60) -> str:
    """What a process's stdout pipe gives until ``marker`` appears, the process ends or
    ``timeout`` passes: never blocked on a process that went quiet."""
    fd = stream.fileno()
    data = b""
    deadline = time.monotonic() + timeout
    while marker.encode() not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
    return data.decode("utf-8", "replace")


def start_sample_system(ports: dict[str, int]) -> subprocess.Popen[str]:
    """``make run``'s runner (``python -m services.run``) on ``ports`` (KIBAN_DEV, MEMBERS,
    ORDERS, GRPC), each service on its own default database, output on a pipe."""
    env = {
        **os.environ,
        **{f"{name}_PORT": str(port) for name, port in ports.items()},
        "LOG_FORMAT": "json",
    }
    env.pop("DATABASE_URL", None)
    env.pop("MEMBERS_URL", None)
    return subprocess.Popen(
        [sys.executable, "-m", "services.run"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def stop_sample_system(process: subprocess.Popen[str], signum: signal.Signals) -> int:
    """The runner's exit code; a runner that does not stop is killed and fails the test."""
    process.send_signal(signum)
    try:
        return process.wait(timeout=45)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f"services.run did not stop within 45 s of {signum.name}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def asgi_scope(
    path: str = "/thing",
    headers: list[tuple[bytes, bytes]] | None = None,
    method: str = "GET",
) -> dict[str, Any]:
    """An HTTP request's ASGI scope, for driving an app or the chassis without a server."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers if headers is not None else [(b"host", b"svc")],
        "client": ("192.0.2.1", 1234),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


async def garbage_left_by(serve: Callable[[], Awaitable[None]]) -> list[object]:
    """What the cyclic GC finds after ``serve`` ran with the GC off: the objects
    reference counting could not free (those in cycles, and what they hold)."""
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds stays in gc.garbage
    try:
        await serve()
        gc.collect()
        return list(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


class Silent:
    """A loopback server that takes connections and never says a word (a blackholed host)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port: int = self.listener.getsockname()[1]
        #: Set once a client has connected: it is waiting for an answer now.
        self.connected = threading.Event()
        self._held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:  # closed
                return
            self._held.append(connection)
            self.connected.set()

    def close(self) -> None:
        self.listener.close()
        for connection in self._held:
            connection.close()


@pytest.fixture
def silent() -> Iterator[Silent]:
    server = Silent()
    yield server
    server.close()


def closed_port() -> int:
    """A loopback port nothing listens on."""
    return free_port()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for the test, dropped afterwards."""
    require(POSTGRES, "PostgreSQL")
    name = f"kiban_{uuid.uuid4().hex[:12]}"
    psql = ["psql", "-h", POSTGRES[0], "-U", "postgres", "-d", "test", "-q", "-c"]
    subprocess.run([*psql, f"CREATE DATABASE {name}"], check=True)
    yield f"postgresql+asyncpg://postgres@{POSTGRES[0]}:{POSTGRES[1]}/{name}"
    subprocess.run([*psql, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"], check=True)


@pytest.fixture
def mariadb_url() -> Iterator[str]:
    """A fresh MariaDB database for the test, dropped afterwards."""
    require(MARIADB, "MariaDB")
    name = f"kiban_{uuid.uuid4().hex[:12]}"
    mysql = ["mariadb", "-h", MARIADB[0], "-P", str(MARIADB[1]), "-u", "root", "-e"]
    subprocess.run([*mysql, f"CREATE DATABASE {name}"], check=True)
    yield f"mysql+asyncmy://root@{MARIADB[0]}:{MARIADB[1]}/{name}"
    subprocess.run([*mysql, f"DROP DATABASE IF EXISTS {name}"], check=True)


@pytest.fixture
def otlp(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """An OTLP receiver that outlives the services under test; spans batched for 100 ms."""
    from tests.receivers import OTLPReceiver, running

    monkeypatch.setenv("TRACE_EXPORT_DELAY", "0.1")
    yield from running(OTLPReceiver())


@pytest.fixture
def redis_url() -> str:
    require(REDIS, "Redis")
    return f"redis://{REDIS[0]}:{REDIS[1]}/0"


@dataclass
class Process:
    """A service running as a real ``kiban run`` process on loopback."""

    popen: subprocess.Popen[bytes]
    url: str
    output: Path

    def lines(self) -> list[dict[str, Any]]:
        result = []
        for raw in self.output.read_bytes().splitlines():
            try:
                result.append(orjson.loads(raw))
            except orjson.JSONDecodeError:
                continue
        return result

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise AssertionError(
                    f"process exited with {self.popen.returncode}:\n{self.output.read_text()}"
                )
            try:
                if httpx.get(f"{self.url}/health/liveness", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"not up within {timeout}s:\n{self.output.read_text()}")

    def stopped_at_once(self, within: float = 2.0) -> list[str | None]:
        """SIGTERM: it exits 0 within ``within`` seconds; its lines' messages."""
        began = time.monotonic()
        self.popen.send_signal(signal.SIGTERM)
        assert self.popen.wait(timeout=10) == 0, self.output.read_text()
        assert time.monotonic() - began < within
        return [line.get("msg") for line in self.lines()]

    def stop(self) -> int:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                return self.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Any]:
    """Start ``kiban run TARGET`` with extra environment; every process is stopped after."""
    started: list[Process] = []

    def start(target: str, wait: bool = True, max_files: int = 0, **env: str) -> Process:
        port = int(env.pop("HTTP_PORT", 0)) or free_port()
        output = tmp_path / f"{target.replace(':', '_')}-{port}.log"
        environment = {
            **os.environ,
            "HTTP_PORT": str(port),
            "LOG_FORMAT": "json",
            "HTTP_DRAIN_SECONDS": "0",
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
            **env,
        }
        with output.open("wb") as sink:
            popen = subprocess.Popen(
                [sys.executable, "-m", "kiban", "run", target],
                cwd=ROOT,
                env=environment,
                stdout=sink,
                stderr=subprocess.STDOUT,
                preexec_fn=(lambda: _limit_files(max_files)) if max_files else None,
            )
        process = Process(popen, f"http://127.0.0.1:{port}", output)
        LOGS.append(output)
        started.append(process)
        if wait:
            process.wait_ready()
        return process

    yield start
    for process in started:
        process.stop()


def start_migrating(spawn: Any, database_url: str, **env: str) -> Process:
    """The light service that migrates at start-up (``tests/apps/migrating.py``),
    against ``database_url``, not waited for."""
    process: Process = spawn(
        "tests.apps.migrating:app",
        wait=False,
        MIGRATE_ON_START="1",
        DATABASE_URL=database_url,
        **env,
    )
    return process


def chassis_around(app: Any, service: Any, lifecycle: Any = None) -> Any:
    """``app`` inside a ``Chassis`` made of ``service``'s collaborators, as the service
    makes its own; ``lifecycle`` replaces the service's start-up and cleanups."""
    from kiban._chassis import Chassis

    return Chassis(
        app,
        api=service.app,
        settings=service.settings,
        policy=service.policy,
        telemetry=service.telemetry,
        health=service.health,
        payloads=service.payloads,
        inflight=service.inflight,
        lifecycle=lifecycle or service,
    )


def _limit_files(count: int) -> None:
    """In the child: at most ``count`` open files (RLIMIT_NOFILE)."""
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (count, count))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``last`` run after all others (the scan of every log)."""
    items.sort(key=lambda item: item.get_closest_marker("last") is not None)
