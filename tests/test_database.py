"""kiban.database: a 2xx means the write is stored, on every supported database."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy import Integer, String, delete, event, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from starlette.testclient import TestClient
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import kiban
from kiban._config import Settings
from kiban.database import ReadOnlyError, ReadSession, Session
from kiban.security import NoSecurity
from tests.conftest import ROOT, Lines, Silent, start_migrating


class Base(DeclarativeBase):
    pass


class Thing(Base):
    __tablename__ = "things"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(50), unique=True)
    count: Mapped[int] = mapped_column(Integer, default=0)


class Order:
    """What happened, in order: commits and response starts."""

    def __init__(self) -> None:
        self.events: list[str] = []


class RecordStart:
    """App middleware (inside kiban's) noting when the response starts."""

    def __init__(self, app: ASGIApp, order: Order) -> None:
        self.app = app
        self.order = order

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def recording(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.order.events.append(f"start {message['status']}")
            await send(message)

        await self.app(scope, receive, recording)


def _app(url: str, order: Order) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with database.engine.begin() as connection:
            await connection.run_sync(Base.metadata.drop_all)
            await connection.run_sync(Base.metadata.create_all)
        yield

    app = FastAPI(lifespan=lifespan)
    service = kiban.Service(app, kiban.Settings(database_url=url), security=NoSecurity())
    database = service.database()
    app.add_middleware(RecordStart, order=order)

    @event.listens_for(AsyncSession.sync_session_class, "after_commit")
    def committed(_: Any) -> None:
        order.events.append("commit")

    @app.post("/things/{name}", status_code=201)
    async def add(name: str, session: Session, count: int = 0) -> dict[str, str]:
        session.add(Thing(name=name, count=count))  # not flushed: the commit writes it
        return {"name": name}

    @app.post("/refused/{name}")
    async def refused(name: str, session: Session) -> None:
        session.add(Thing(name=name))
        await session.flush()
        raise kiban.Problem(400, "Changed my mind.")

    @app.get("/things")
    async def names(session: ReadSession) -> list[str]:
        return list(await session.scalars(select(Thing.name).order_by(Thing.id)))

    app.state.remove_listener = lambda: event.remove(
        AsyncSession.sync_session_class, "after_commit", committed
    )
    return app


@pytest.fixture(params=["sqlite", "postgres_url", "mariadb_url"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/things.db"
    value: str = request.getfixturevalue(request.param)
    return value


@pytest.fixture
def client(url: str) -> Iterator[tuple[TestClient, Order]]:
    order = Order()
    app = _app(url, order)
    try:
        with TestClient(app) as test_client:
            yield test_client, order
    finally:
        app.state.remove_listener()


def test_the_commit_happens_before_the_response_starts(client: tuple[TestClient, Order]) -> None:
    test_client, order = client
    assert test_client.post("/things/first").status_code == 201
    assert order.events == ["commit", "start 201"]
    assert test_client.get("/things").json() == ["first"]


def test_a_commit_refused_by_a_constraint_is_409_not_201(
    client: tuple[TestClient, Order],
) -> None:
    test_client, order = client
    assert test_client.post("/things/twice").status_code == 201
    order.events.clear()
    response = test_client.post("/things/twice")
    assert response.status_code == 409
    assert response.headers["content-type"] == "application/problem+json"
    assert order.events == ["start 409"]  # nothing committed
    assert test_client.get("/things").json() == ["twice"]


@pytest.mark.parametrize("url", ["postgres_url", "mariadb_url"], indirect=True)
@pytest.mark.parametrize(
    ("name", "count"), [("big", 2**40), ("n" * 51, 0)], ids=["integer", "string"]
)
def test_a_value_the_column_cannot_hold_is_422_at_commit(
    client: tuple[TestClient, Order], name: str, count: int
) -> None:
    """SQLite stores any value in any column; the others refuse, and that is the client's."""
    test_client, order = client
    response = test_client.post(f"/things/{name}", params={"count": count})
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    assert "commit" not in order.events
    assert test_client.get("/things").json() == []


def test_a_handler_that_raises_stores_nothing(client: tuple[TestClient, Order]) -> None:
    test_client, order = client
    assert test_client.post("/refused/no").status_code == 400
    assert "commit" not in order.events
    assert test_client.get("/things").json() == []


def test_a_read_commits_nothing(client: tuple[TestClient, Order]) -> None:
    test_client, order = client
    assert test_client.post("/things/kept").status_code == 201
    order.events.clear()
    assert test_client.get("/things").json() == ["kept"]
    assert order.events == ["start 200"]


async def test_a_read_session_refuses_every_write(url: str) -> None:
    from sqlalchemy.pool import AsyncAdaptedQueuePool

    service = kiban.Service(FastAPI(), kiban.Settings(database_url=url), security=NoSecurity())
    # A pool with counts (older SQLAlchemy gives file SQLite a NullPool, which has none).
    database = service.database(poolclass=AsyncAdaptedQueuePool)
    try:
        async with database.engine.begin() as connection:
            await connection.run_sync(Base.metadata.drop_all)
            await connection.run_sync(Base.metadata.create_all)
        async with database.transaction() as session:
            session.add(Thing(name="kept", count=1))
        writes = [
            insert(Thing).values(name="added"),
            update(Thing).values(count=2),
            delete(Thing),
        ]

        async def execute(write: Any) -> None:
            async with database.reading() as session:
                await session.execute(write)

        async def flush() -> None:
            async with database.reading() as session:
                (await session.scalars(select(Thing))).one().count = 3
                session.add(Thing(name="flushed"))
                await session.flush()

        for write in writes:
            with pytest.raises(ReadOnlyError):
                await execute(write)
        with pytest.raises(ReadOnlyError):
            await flush()
        async with database.reading() as session:
            stored = [(thing.name, thing.count) for thing in await session.scalars(select(Thing))]
        assert stored == [("kept", 1)]
        assert database.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        await database.dispose()


async def test_on_postgresql_a_read_opens_no_transaction(postgres_url: str) -> None:
    """Each statement of a read is its own: no BEGIN before it, no COMMIT after it.

    ``now()`` is the time the transaction began: equal for two statements in one, apart
    for two statements each in its own. A connection a read used is a transactional one
    again for the next writer (a pool of one hands the same connection to both). The
    read's statements are traced as any others.
    """
    import asyncio

    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    service = kiban.Service(
        FastAPI(), kiban.Settings(database_url=postgres_url), security=NoSecurity()
    )
    database = service.database(pool_size=1, max_overflow=0)
    exporter = InMemorySpanExporter()
    service.telemetry.tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    now = text("SELECT now()")
    try:
        with service.telemetry.tracer.start_as_current_span("request"):
            async with database.reading() as session:
                first = (await session.execute(now)).scalar()
                await asyncio.sleep(0.01)
                assert (await session.execute(now)).scalar() != first
        traced = [
            span.attributes["db.query.text"]
            for span in exporter.get_finished_spans()
            if span.name == "SELECT database"
        ]
        assert traced == ["SELECT now()", "SELECT now()"]
        async with database.transaction() as session:
            first = (await session.execute(now)).scalar()
            await asyncio.sleep(0.01)
            assert (await session.execute(now)).scalar() == first
    finally:
        await database.dispose()


def test_sqlite_is_opened_durable(tmp_path: Path) -> None:
    """WAL and an fsync at every commit: a 201 survives kill -9 and power loss."""
    order = Order()
    app = _app(f"sqlite+aiosqlite:///{tmp_path}/durable.db", order)
    try:
        with TestClient(app) as test_client:
            test_client.post("/things/x")
            database = kiban.Service.of(app).default_database
            assert database is not None

            async def pragmas() -> tuple[str, int]:
                async with database.engine.connect() as connection:
                    mode = (await connection.execute(text("PRAGMA journal_mode"))).scalar_one()
                    sync = (await connection.execute(text("PRAGMA synchronous"))).scalar_one()
                    return mode, sync

            assert test_client.portal is not None
            assert test_client.portal.call(pragmas) == ("wal", 2)  # 2 is FULL
    finally:
        app.state.remove_listener()
    # Another process sees the committed row: it is on disk, not in our page cache.
    with sqlite3.connect(tmp_path / "durable.db") as connection:
        assert connection.execute("SELECT name FROM things").fetchall() == [("x",)]


def test_session_without_a_database_is_a_bug_that_says_so(lines: Lines) -> None:
    app = FastAPI()
    kiban.Service(app, kiban.Settings(), security=NoSecurity())

    @app.get("/x")
    async def x(session: Session) -> None:
        return None

    with TestClient(app) as test_client:
        assert test_client.get("/x").status_code == 500
    [bug] = [line for line in lines.app() if line.get("msg") == "unhandled exception"]
    assert "call service.database() first" in bug["exception"]


@pytest.mark.parametrize("migrate", [True, False])
def test_migrations_run_at_start_up_when_asked(tmp_path: Path, migrate: bool) -> None:
    """``service.database(migrations=...)`` upgrades the schema before the service is ready."""
    import sqlite3

    from fastapi import FastAPI
    from starlette.testclient import TestClient

    from kiban.security import NoSecurity
    from services.members.migrations import HERE

    path = tmp_path / "members.db"
    settings = Settings(database_url=f"sqlite+aiosqlite:///{path}", migrate_on_start=migrate)
    app = FastAPI()
    service = kiban.Service(app, settings, security=NoSecurity())
    service.database(migrations=HERE)
    with TestClient(app) as client:
        assert client.get("/health/readiness").status_code == 200
    tables = {row[0] for row in sqlite3.connect(path).execute("select name from sqlite_master")}
    assert ("members" in tables) is migrate


def test_a_failing_start_up_hook_stops_the_start_and_runs_the_cleanups() -> None:
    from fastapi import FastAPI
    from starlette.testclient import TestClient

    from kiban.security import NoSecurity

    app = FastAPI()
    service = kiban.Service(app, Settings(), security=NoSecurity())
    closed: list[str] = []

    async def broken() -> None:
        raise RuntimeError("schema is ahead of the code")

    async def close() -> None:
        closed.append("pool")

    service.on_startup(broken)
    service.on_shutdown(close)
    with pytest.raises(RuntimeError, match="schema is ahead"), TestClient(app):
        pass
    assert closed == ["pool"]


def test_each_statement_is_a_child_span_and_a_duration_and_the_pool_is_observed(
    tmp_path: Path,
) -> None:
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind, StatusCode

    app = FastAPI()
    service = kiban.Service(app, Settings(), security=NoSecurity())
    from sqlalchemy.pool import AsyncAdaptedQueuePool

    # A pool with counts (older SQLAlchemy gives file SQLite a NullPool, which has none).
    service.database(f"sqlite+aiosqlite:///{tmp_path}/t.db", poolclass=AsyncAdaptedQueuePool)
    exporter = InMemorySpanExporter()
    service.telemetry.tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))

    @app.get("/answer")
    async def answer(session: Session) -> int:
        return int((await session.execute(text("SELECT 42"))).scalar_one())

    @app.get("/wrong")
    async def wrong(session: Session) -> int:
        await session.execute(text("SELECT * FROM no_such_table"))
        return 0

    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/answer").json() == 42
        assert client.get("/wrong").status_code >= 500
        metrics = client.get("/metrics").text
    spans = exporter.get_finished_spans()
    server = next(s for s in spans if s.name == "GET /answer")
    statement = next(
        s
        for s in spans
        if s.kind == SpanKind.CLIENT and s.attributes.get("db.query.text") == "SELECT 42"
    )
    assert statement.name == "SELECT database"
    assert statement.attributes["db.system.name"] == "sqlite"
    assert statement.parent is not None
    assert statement.parent.span_id == server.context.span_id  # inside the request's span
    failed = next(
        s for s in spans if s.attributes.get("db.query.text") == "SELECT * FROM no_such_table"
    )
    assert failed.status.status_code == StatusCode.ERROR
    assert 'db_operation_name="SELECT"' in metrics
    assert "db_client_operation_duration_seconds_count" in metrics
    assert 'error_type="OperationalError"' in metrics
    pool = [line for line in metrics.splitlines() if line.startswith("db_client_connection_count{")]
    assert any('state="idle"' in line and 'pool_name="database"' in line for line in pool)
    assert any('state="used"' in line for line in pool)


def _sleep(url: str, seconds: float) -> Any:
    function = "pg_sleep" if url.startswith("postgresql") else "SLEEP"
    return text(f"SELECT {function}({seconds})")


def _running_sleeps(url: str) -> Any:
    if url.startswith("postgresql"):
        # Running ones only: an idle backend shows its last query too, and the stopped
        # statement's connection may not have rolled back yet when this is asked.
        return text(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE query LIKE '%pg_sleep(3%' AND state = 'active' AND pid <> pg_backend_pid()"
        )
    return text(
        "SELECT count(*) FROM information_schema.processlist "
        "WHERE info LIKE '%SLEEP(3%' AND id <> connection_id()"
    )


@pytest.fixture(params=["postgres_url", "mariadb_url"])
def server_url(request: pytest.FixtureRequest) -> str:
    value: str = request.getfixturevalue(request.param)
    return value


_UPGRADE = """
import asyncio, sys
from sqlalchemy.ext.asyncio import create_async_engine
from kiban.database import upgrade
from tests.apps.migrations import HERE

async def main() -> None:
    engine = create_async_engine(sys.argv[1])
    print("ready", flush=True)
    sys.stdin.readline()  # all start at once
    try:
        await upgrade(engine, HERE)
    finally:
        await engine.dispose()

asyncio.run(main())
"""


def test_replicas_that_migrate_on_start_together_take_turns(server_url: str) -> None:
    """Three replicas start at once with MIGRATE_ON_START and a migration that takes
    0.5 s. Without a lock they raced: all but one failed on a duplicate table."""
    replicas = [
        subprocess.Popen(
            [sys.executable, "-c", _UPGRADE, server_url],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    for replica in replicas:
        assert replica.stdout is not None
        assert replica.stdout.readline().strip() == "ready"
    for replica in replicas:
        assert replica.stdin is not None
        replica.stdin.write("go\n")
        replica.stdin.flush()
    outcomes = [replica.communicate(timeout=60) for replica in replicas]
    assert [replica.returncode for replica in replicas] == [0, 0, 0], outcomes

    async def schema() -> tuple[list[str], int]:
        engine = create_async_engine(server_url)
        try:
            async with engine.connect() as connection:
                versions = (
                    await connection.execute(text("SELECT version_num FROM alembic_version"))
                ).scalars()
                rows = (await connection.execute(text("SELECT count(*) FROM slow"))).scalar_one()
                return list(versions), rows
        finally:
            await engine.dispose()

    assert asyncio.run(schema()) == (["0001"], 0)


@pytest.mark.parametrize("opened", ["transaction", "reading"])
async def test_a_budget_bounds_the_statements_on_the_database_server(
    server_url: str, opened: str
) -> None:
    import time

    from kiban import _propagation as propagation

    service = kiban.Service(
        FastAPI(), kiban.Settings(database_url=server_url), security=NoSecurity()
    )
    database = service.database()
    pool = database.engine.pool
    try:
        async with database.transaction() as session:  # no budget: as long as it takes
            assert (await session.execute(_sleep(server_url, 0.2))).scalar() in (0, "", None)
        token = propagation.DEADLINE.set(time.monotonic() + 0.4)
        try:
            began = time.monotonic()
            with pytest.raises(kiban.Problem) as stopped:
                async with getattr(database, opened)() as session:
                    await session.execute(_sleep(server_url, 3))
            assert stopped.value.status == 504
            assert time.monotonic() - began < 1.5  # stopped at the budget, not after 3 s
        finally:
            propagation.DEADLINE.reset(token)
        # The database stopped working for it: nothing sleeps there on its behalf.
        async with database.transaction() as session:
            assert (await session.execute(_running_sleeps(server_url))).scalar() == 0
        assert pool.checkedout() == 0  # type: ignore[attr-defined]
        # A transaction begun with nothing left takes no connection at all.
        token = propagation.DEADLINE.set(time.monotonic() - 0.01)
        try:
            connects: list[object] = []
            event.listen(database.engine.sync_engine, "checkout", connects.append)
            with pytest.raises(kiban.Problem) as spent:
                async with getattr(database, opened)():
                    pass
            assert spent.value.status == 504
            assert connects == []
        finally:
            propagation.DEADLINE.reset(token)
    finally:
        await database.dispose()


def test_a_callers_budget_reaches_the_database_and_the_answer_is_504(
    server_url: str, lines: Lines
) -> None:
    from kiban.testing import client

    app = FastAPI()
    service = kiban.Service(
        app,
        kiban.Settings(database_url=server_url, trusted_proxies=["127.0.0.1"]),
        security=NoSecurity(),
    )
    service.database()

    @app.get("/slow")
    async def slow(session: Session) -> dict[str, str]:
        await session.execute(_sleep(server_url, 3))
        return {"slept": "3 s"}

    with client(app, peer=("127.0.0.1", 50000)) as started:
        answer = started.get("/slow", headers={"x-request-timeout-ms": "400"})
        assert answer.status_code == 504
        assert answer.headers["content-type"] == "application/problem+json"
    assert not [line for line in lines.all() if line.get("level") == "error"]


def test_a_handler_timed_out_mid_statement_gives_its_connection_back(
    server_url: str, lines: Lines
) -> None:
    from kiban import Timeout
    from kiban.testing import client

    app = FastAPI()
    service = kiban.Service(app, kiban.Settings(database_url=server_url), security=NoSecurity())
    database = service.database(pool_size=1, max_overflow=0, pool_timeout=2)

    @app.get("/slow", dependencies=[Timeout(0.3)])
    async def slow(session: Session) -> dict[str, str]:
        await session.execute(_sleep(server_url, 3))
        return {"slept": "3 s"}

    @app.get("/quick")
    async def quick(session: Session) -> dict[str, int]:
        return {"one": (await session.execute(text("SELECT 1"))).scalar_one()}

    with client(app) as started:
        for _ in range(3):  # a pool of one: each 504 must have given the connection back
            assert started.get("/slow").status_code == 504
            assert started.get("/quick").json() == {"one": 1}
        assert database.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert not [line for line in lines.all() if line.get("level") == "error"]


@pytest.mark.parametrize("idle_ping", [True, False])
def test_a_pooled_connection_dropped_while_idle_is_pinged_and_replaced(
    server_url: str, idle_ping: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    import kiban.database
    from tests.proxy import Proxy

    upstream = ("127.0.0.1", 5432) if server_url.startswith("postgresql") else ("127.0.0.1", 3306)
    proxy = Proxy(upstream)
    proxy.start()
    proxied = server_url.replace(f":{upstream[1]}/", f":{proxy.port}/")
    # Idle past the threshold, or "busy": reused well within it.
    monkeypatch.setattr(kiban.database, "PING_AFTER_IDLE", 0.1 if idle_ping else 3600.0)
    app = FastAPI()
    service = kiban.Service(app, kiban.Settings(), security=NoSecurity())
    service.database(proxied, pool_size=1, max_overflow=0)

    @app.get("/one")
    async def one(session: Session) -> dict[str, int]:
        return {"one": (await session.execute(text("SELECT 1"))).scalar_one()}

    try:
        with TestClient(app) as client:
            assert client.get("/one").status_code == 200  # the pool holds a connection now
            proxy.cut()  # the server side of it goes away while it sits in the pool
            proxy.restore()
            time.sleep(0.3)
            first = client.get("/one")
            if idle_ping:
                assert first.status_code == 200  # pinged on checkout, replaced, served
            else:
                # Never pinged while busy: the dead connection fails its request once
                # (a 503, not a 500), and the pool replaces it and every older one.
                assert first.status_code == 503
            assert client.get("/one").status_code == 200
    finally:
        proxy.cut()


async def test_the_pool_reports_used_idle_overflow_and_waiting(postgres_url: str) -> None:
    import asyncio

    import httpx

    app = FastAPI()
    service = kiban.Service(app, kiban.Settings(), security=NoSecurity())
    service.database(postgres_url, pool_size=1, max_overflow=1, pool_timeout=10)
    release = asyncio.Event()

    @app.get("/hold")
    async def hold(session: Session) -> None:
        await session.execute(text("SELECT 1"))
        await release.wait()

    def count(text_: str, state: str) -> float:
        line = next(
            line
            for line in text_.splitlines()
            if line.startswith("db_client_connection_count{") and f'state="{state}"' in line
        )
        return float(line.rsplit(" ", 1)[1])

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        held = [asyncio.ensure_future(client.get("/hold")) for _ in range(3)]
        await asyncio.sleep(1.0)  # two hold a connection (one of them past the pool's size)
        metrics = (await client.get("/metrics")).text
        release.set()
        assert [(await answer).status_code for answer in held] == [200, 200, 200]
    assert count(metrics, "used") == 2
    assert count(metrics, "overflow") == 1
    assert count(metrics, "waiting") == 1


async def test_the_pool_keeps_its_connections_under_steady_load(postgres_url: str) -> None:
    """DATABASE_POOL_SIZE connections, reused: past them a request waits, none is
    opened and closed per request (SQLAlchemy's default overflow would)."""
    import asyncio

    import httpx

    app = FastAPI()
    settings = kiban.Settings(database_pool_size=3)
    service = kiban.Service(app, settings, security=NoSecurity())
    db = service.database(postgres_url)
    opened = []
    event.listen(db.engine.sync_engine, "connect", lambda *_: opened.append(1))

    @app.get("/one")
    async def one(session: Session) -> int:
        await session.execute(text("SELECT pg_sleep(0.01)"))
        return 1

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for _ in range(5):  # rounds of 8 at once: more than the pool holds
            answers = await asyncio.gather(*(client.get("/one") for _ in range(8)))
            assert [answer.status_code for answer in answers] == [200] * 8
    assert len(opened) == 3
    assert db.engine.pool.size() == 3  # type: ignore[attr-defined]
    await db.dispose()


async def test_transactions_get_the_pools_connections_in_the_order_they_asked(
    postgres_url: str,
) -> None:
    """Under contention requests are served in the order they asked: 24 workers asking
    again as soon as they are done share two connections. The pool's own queue lets a
    newcomer take a connection a waiter was woken for and sends the waiter to the back
    of the line, a whole round later (measured: the longest wait twice the typical).

    Order, not time, is asserted: tickets taken when asking, in the order served, may
    only swap with the other connection's holder (connections are two).
    """
    import asyncio
    import itertools
    import time

    app = FastAPI()
    service = kiban.Service(app, kiban.Settings(), security=NoSecurity())
    db = service.database(postgres_url, pool_size=2, max_overflow=0)
    tickets = itertools.count()
    served: list[int] = []
    end = time.monotonic() + 1.0

    async def worker() -> None:
        while time.monotonic() < end:
            ticket = next(tickets)
            async with db.transaction() as session:
                served.append(ticket)
                await session.execute(text("SELECT pg_sleep(0.002)"))

    await asyncio.gather(*(worker() for _ in range(24)))
    await db.dispose()
    assert len(served) > 100
    overtaken = max(position - ticket for position, ticket in enumerate(served))
    assert overtaken <= 2, served


@pytest.mark.process
@pytest.mark.parametrize(
    ("driver", "server"),
    [
        ("postgresql+asyncpg", "uvicorn"),
        ("mysql+asyncmy", "granian"),
    ],
)
def test_a_database_that_never_answers_fails_the_start_in_its_connect_timeout(
    spawn: Any, silent: Silent, driver: str, server: str
) -> None:
    """Fault drill: the database's address takes connections and never answers. The
    migration at start-up waited asyncpg's own 60 s, then the start failed with no word
    of why: a ``TimeoutError`` has no message, and the server logged an empty line."""
    import time

    url = f"{driver}://root@127.0.0.1:{silent.port}/test"
    service = start_migrating(spawn, url, SERVER=server, DATABASE_CONNECT_TIMEOUT="0.5")
    assert silent.connected.wait(20), service.output.read_text()
    began = time.monotonic()
    assert service.popen.wait(timeout=20) == 3, service.output.read_text()
    assert time.monotonic() - began < 3
    lines = service.lines()
    [failed] = [line for line in lines if line.get("msg") == "start-up failed"]
    assert failed["level"] == "error"
    assert "TimeoutError" in failed["error"]
    assert "upgrade" in failed["exception"]  # the traceback says where: the migration
    assert lines[-1]["msg"] == "not started"
    assert f"127.0.0.1:{silent.port} did not answer in 0.5 s" in failed["error"]
    # One traceback, in that line: the server adds none of its own.
    assert [line for line in lines if "Traceback" in str(line)] == [failed]


@pytest.mark.parametrize("driver", ["postgresql+asyncpg", "mysql+asyncmy"])
def test_a_request_whose_database_never_answers_gets_503_in_the_connect_timeout(
    silent: Silent, driver: str
) -> None:
    """The database's address takes connections and never answers: each request waited
    for the driver (asyncpg 60 s, asyncmy's handshake for ever) until its handler's time
    ran out, holding a turn at the pool all along."""
    import time

    app = FastAPI()
    settings = kiban.Settings(
        database_url=f"{driver}://root@127.0.0.1:{silent.port}/test",
        database_connect_timeout=0.3,
    )
    service = kiban.Service(app, settings, security=NoSecurity())
    service.database()

    @app.get("/things")
    async def names(session: Session) -> list[str]:
        return list(await session.scalars(select(Thing.name)))

    with TestClient(app) as client:
        began = time.monotonic()
        response = client.get("/things")
        assert time.monotonic() - began < 1.5
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["retry-after"] == "1"
    assert silent.connected.is_set()
