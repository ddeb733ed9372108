"""The database a service's handlers write to: a 2xx means the write is stored.

A handler's session commits **before the response starts**. FastAPI runs the teardown of
an ordinary ``yield`` dependency after the response has been sent, so a session
committed there acknowledges a write (201) that a failed commit, a cut link or a
``kill -9`` a moment later loses. kiban's ``Session`` dependency is declared with
FastAPI's ``scope="function"``, whose teardown runs when the handler returns and before
the response goes out: a commit that fails becomes the response (409 for a constraint,
422 for a value the column cannot hold, 503 when the database is unreachable), never a
2xx.

SQLite, the embedded default, is opened in WAL mode with ``synchronous=FULL``: a
committed transaction survives the process being killed and the machine losing power.

A request that carries a time budget (a trusted caller's ``x-request-timeout-ms``, a
gRPC deadline) bounds its statements by what is left of it: PostgreSQL gets
``SET LOCAL statement_timeout`` when the transaction begins, MariaDB each statement as
``SET STATEMENT max_statement_time=... FOR ...``. A statement the database stops for
that reason, or a transaction begun with nothing left, is answered 504: the caller has
stopped waiting, and the database stops working for it too.

A handler that only reads takes a ``ReadSession``: it cannot write (a flush or an
INSERT, UPDATE or DELETE through it raises), and on PostgreSQL it opens no transaction,
so a one-statement read is one round trip instead of three (``BEGIN``, the statement,
``COMMIT``: asyncpg and psycopg send ``BEGIN`` as a statement of its own). Each of its
statements then sees its own snapshot; a read that needs one snapshot across several
statements takes ``Session``.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends, Request
from pydantic import AfterValidator

from kiban import _extras

try:
    from sqlalchemy import event, exc, orm, text
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
except ImportError:
    raise _extras.MissingExtra("kiban.database needs kiban[db]: pip install 'kiban[db]'") from None

from kiban import _errors
from kiban import _log as log
from kiban import _propagation as propagation
from kiban._migrate import run_env, upgrade

__all__ = [
    "SQLITE_PRAGMAS",
    "Database",
    "ReadOnlyError",
    "ReadSession",
    "Session",
    "UTCDateTime",
    "read_session",
    "refusal",
    "run_env",
    "session",
    "upgrade",
    "utcnow",
]


def utcnow() -> datetime:
    """Now, in UTC, time zone attached: the default for a model's timestamps."""
    return datetime.now(UTC)


def _utc(value: datetime) -> datetime:
    """Databases without time zones (SQLite) give naive datetimes; they are UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


#: A datetime that always leaves the API with its time zone (RFC 3339), whichever
#: database it was read from: use it in response schemas.
UTCDateTime = Annotated[datetime, AfterValidator(_utc)]

#: Set on every SQLite connection: committed transactions survive ``kill -9`` and power
#: loss (WAL, fsync at each commit); writers wait for each other instead of failing.
SQLITE_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=FULL",
    "PRAGMA busy_timeout=5000",
)


#: Statements of a budgeted request end this much before its deadline: time for the
#: database's own error to arrive, the transaction to roll back and the 504 to go out
#: before the request's handler would be cancelled mid-statement.
STATEMENT_MARGIN = 0.1


#: Statements MariaDB's ``SET STATEMENT ... FOR`` takes.
_BOUNDED = re.compile(r"\s*(SELECT|INSERT|UPDATE|DELETE|REPLACE|WITH)\b", re.IGNORECASE)
#: What a statement stopped at its time limit raises: PostgreSQL's SQLSTATE, MariaDB's
#: and MySQL's error numbers.
_TIMED_OUT_STATES = {"57014"}
_TIMED_OUT_ERRORS = {1969, 3024}


def _mariadb_bounded(
    conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool
) -> tuple[str, Any]:
    """Bound a statement run for a request with a budget by what is left of it."""
    left = propagation.remaining()
    if left is None or not conn.dialect.is_mariadb or not _BOUNDED.match(statement):
        return statement, parameters
    bound = max(left - STATEMENT_MARGIN, 0.001)
    return f"SET STATEMENT max_statement_time={bound:.3f} FOR {statement}", parameters


def _timed_out(error: exc.DBAPIError) -> bool:
    """Whether the database stopped the statement at its time limit."""
    original = error.orig
    if str(getattr(original, "sqlstate", None) or "") in _TIMED_OUT_STATES:
        return True
    arguments: tuple[Any, ...] = getattr(original, "args", ())
    return bool(arguments) and arguments[0] in _TIMED_OUT_ERRORS


def _out_of_time() -> _errors.Problem:
    return _errors.Problem(504, "The request's time ran out before the database answered.")


#: A connection idle in the pool this long is pinged before it is handed out.
PING_AFTER_IDLE = 10.0
_IDLE_SINCE = "kiban.idle_since"


def _idle_since(_dbapi_connection: Any, record: Any) -> None:
    record.info[_IDLE_SINCE] = time.monotonic()


def _ping_if_idle(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    """Ping a connection that sat idle (a server or a proxy may have dropped it since).

    A busy service's connections are reused within moments and never pinged: no extra
    round trip on the request path, where a ping at every checkout costs one. A ping
    that fails raises ``DisconnectionError``, on which SQLAlchemy's pool discards the
    connection and hands out a fresh one (its documented custom ping). A connection
    that fails mid-use all the same is discarded with every older one in the pool.
    """
    since = record.info.get(_IDLE_SINCE)
    if since is None or time.monotonic() - since < PING_AFTER_IDLE:
        return
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("SELECT 1")
    except Exception as error:
        raise exc.DisconnectionError() from error
    finally:
        cursor.close()


def _sqlite_durable(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        for pragma in SQLITE_PRAGMAS:
            cursor.execute(pragma)
    finally:
        cursor.close()


class ReadOnlyError(exc.InvalidRequestError):
    """A write was attempted through a read session: a bug in the handler, not the client's."""


class _ReadOnlySession(orm.Session):
    """The session behind ``ReadSession``: it refuses to write (see ``_refuse_*``)."""


_READ_ONLY = "a read session does not write: take kiban.database.Session to write"


def _refuse_flush(session: orm.Session, _context: Any, _instances: Any) -> None:
    raise ReadOnlyError(_READ_ONLY)


def _refuse_dml(state: orm.ORMExecuteState) -> None:
    if state.is_insert or state.is_update or state.is_delete:
        raise ReadOnlyError(_READ_ONLY)


event.listen(_ReadOnlySession, "before_flush", _refuse_flush)
event.listen(_ReadOnlySession, "do_orm_execute", _refuse_dml)


def _read_only(bind: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions on ``bind`` that refuse to write."""
    return async_sessionmaker(
        bind, expire_on_commit=False, autoflush=False, sync_session_class=_ReadOnlySession
    )


class Database:
    """An engine, its sessions, and the transaction each request's handler runs in."""

    def __init__(
        self,
        engine: AsyncEngine,
        name: str = "database",
        connections: int | None = None,
        connect_timeout: float | None = None,
    ) -> None:
        self.engine = engine
        self.name = name
        #: Seconds a transaction may wait for its connection once its turn has come: a
        #: pooled one at once, a new one as long as the database takes to open it. None:
        #: as long as the driver waits (asyncpg 60 s; asyncmy's handshake, for ever).
        self.connect_timeout = connect_timeout
        #: Transactions take the pool's ``connections`` in the order they asked. The
        #: pool's own wait (an ``asyncio.Queue``) lets a newcomer take a connection a
        #: waiter was woken for, and sends that waiter to the back of the line: under
        #: contention some requests waited ten times as long as the rest. None: the
        #: pool does not make anyone wait (SQLite's).
        self._turns = asyncio.Semaphore(connections) if connections else None
        self.sessions = async_sessionmaker(engine, expire_on_commit=False)
        backend = engine.url.get_backend_name()
        #: PostgreSQL bounds a budgeted transaction's statements with one ``SET LOCAL``.
        self._set_local = backend == "postgresql"
        #: Sessions that refuse to write. On PostgreSQL, the unbudgeted ones run without
        #: a transaction: the same pool, its connections switched to autocommit at
        #: checkout (a flag in the driver, no round trip) and back when returned.
        self._read_sessions = _read_only(engine)
        self._direct_reads = (
            _read_only(engine.execution_options(isolation_level="AUTOCOMMIT"))
            if self._set_local
            else None
        )
        event.listen(engine.sync_engine, "checkin", _idle_since)
        event.listen(engine.sync_engine, "checkout", _ping_if_idle)
        if backend == "sqlite":
            event.listen(engine.sync_engine, "connect", _sqlite_durable)
        elif backend in ("mysql", "mariadb"):
            event.listen(engine.sync_engine, "before_cursor_execute", _mariadb_bounded, retval=True)
        #: Transactions waiting for a connection from the pool (``db.client.connection.count``).
        self.waiting = 0
        #: The dependency giving a handler a session of this database, committed before
        #: the response starts: ``session: AsyncSession = db.session``.
        self.session: Any = Depends(self._dependency, scope="function")
        #: The dependency giving a handler a session that only reads (``ReadSession``).
        self.read_session: Any = Depends(self._read_dependency, scope="function")

    def transaction(self) -> AbstractAsyncContextManager[AsyncSession]:
        """A session in one transaction: committed when the block ends, rolled back if it raises.

        A commit that fails is raised as what it means for the client: a ``Problem``
        409 (constraint) or 422 (a value out of the column's range), or the driver's
        own connection error, which kiban answers 503.
        """
        return self._session(self.sessions, commit=True)

    def reading(self) -> AbstractAsyncContextManager[AsyncSession]:
        """A session that only reads, given back when the block ends.

        On PostgreSQL without a budget it runs without a transaction: each statement is
        one round trip and sees its own snapshot. With a budget (which PostgreSQL
        applies with ``SET LOCAL``), and on other databases, it is a transaction that is
        rolled back: the same round trips as one that commits.
        """
        direct = self._direct_reads
        if direct is not None and propagation.remaining() is None:
            return self._session(direct, commit=False)
        return self._session(self._read_sessions, commit=False)

    @asynccontextmanager
    async def _session(
        self, sessions: Callable[[], AsyncSession], commit: bool
    ) -> AsyncIterator[AsyncSession]:
        left = propagation.remaining()
        if left is not None and left <= 0:
            raise _out_of_time()  # no budget left: not even a connection is taken
        async with self._turn(), sessions() as session:
            try:
                self.waiting += 1
                try:  # the connection the first statement would take, counted while awaited
                    await self._connection(session)
                finally:
                    self.waiting -= 1
                if left is not None and self._set_local:
                    milliseconds = max(1, int((left - STATEMENT_MARGIN) * 1000))
                    await session.execute(text(f"SET LOCAL statement_timeout = {milliseconds}"))
                yield session
            except exc.DBAPIError as error:
                await _rollback(session)
                if _timed_out(error):
                    log.info("statement timed out", database=self.name)
                    raise _out_of_time() from None
                raise
            except asyncio.CancelledError:
                # Cancelled (its handler's time ran out, a shutdown), perhaps mid-statement:
                # the connection's state is unknown, so it is closed rather than rolled
                # back and reused; the pool opens a fresh one when it needs one. (The 504
                # has gone out already: kiban answers at the deadline, not after this.)
                await _invalidate(session)
                raise
            except BaseException:
                await _rollback(session)
                raise
            if not commit:
                return  # closing the session rolls back what a budgeted read began
            try:
                await session.commit()
            except exc.DBAPIError as error:
                await _rollback(session)
                problem = refusal(error)
                if problem is None:
                    raise
                log.info("commit refused", database=self.name, status=problem.status)
                raise problem from None

    async def _connection(self, session: AsyncSession) -> None:
        """Give ``session`` its connection within ``connect_timeout``, or raise
        SQLAlchemy's ``TimeoutError`` (answered 503, as a database that is down)."""
        try:
            async with asyncio.timeout(self.connect_timeout):
                await session.connection()
        except TimeoutError:
            raise exc.TimeoutError(
                f"{self.name} gave no connection within {self.connect_timeout} s"
            ) from None

    @asynccontextmanager
    async def _turn(self) -> AsyncIterator[None]:
        """Wait for a turn at the pool, first come first served (counted as waiting)."""
        turns = self._turns
        if turns is None:
            yield
            return
        self.waiting += 1
        try:
            await turns.acquire()
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            turns.release()

    async def _dependency(self) -> AsyncIterator[AsyncSession]:
        async with self.transaction() as session:
            yield session

    async def _read_dependency(self) -> AsyncIterator[AsyncSession]:
        async with self.reading() as session:
            yield session

    async def dispose(self) -> None:
        await self.engine.dispose()


def refusal(error: exc.DBAPIError) -> _errors.Problem | None:
    """What a write the database refused means for the client, if it is the client's doing.

    SQLSTATE class 23 (a constraint) is a 409, class 22 (a value the column cannot hold)
    a 422; drivers that give no SQLSTATE are judged by SQLAlchemy's error class.
    """
    state = str(getattr(error.orig, "sqlstate", None) or "")
    if isinstance(error, exc.IntegrityError) or state.startswith("23"):
        return _errors.Problem(409, "The request conflicts with data already stored.")
    if isinstance(error, exc.DataError) or state.startswith("22"):
        return _errors.Problem(422, "A value is outside what the database can store.")
    return None


async def _invalidate(session: AsyncSession) -> None:
    try:
        await session.invalidate()
    except (exc.SQLAlchemyError, OSError):
        log.warning("closing a cancelled transaction's connection failed")


async def _rollback(session: AsyncSession) -> None:
    """Roll back without letting a second failure hide the first."""
    try:
        await session.rollback()
    except (TimeoutError, exc.SQLAlchemyError, OSError):
        log.warning("rollback failed")


def _default(request: Request) -> Database:
    service = getattr(request.app.state, "kiban", None)  # installed by kiban.Service
    database = getattr(service, "default_database", None)
    if database is None:
        raise RuntimeError("kiban.Session needs a database: call service.database() first")
    assert isinstance(database, Database)
    return database


async def session(request: Request) -> AsyncIterator[AsyncSession]:
    """The service's first database's session, committed before the response starts."""
    async with _default(request).transaction() as value:
        yield value


async def read_session(request: Request) -> AsyncIterator[AsyncSession]:
    """The service's first database's session for reads (``Database.reading``)."""
    async with _default(request).reading() as value:
        yield value


#: A handler parameter typed ``Session`` gets a session of the service's database in a
#: transaction that commits before the response starts.
Session = Annotated[AsyncSession, Depends(session, scope="function")]
#: A handler parameter typed ``ReadSession`` gets a session of the service's database
#: that cannot write; on PostgreSQL a one-statement read through it is one round trip.
ReadSession = Annotated[AsyncSession, Depends(read_session, scope="function")]
