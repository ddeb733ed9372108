"""Context logging: ``log.info("order placed", order_id=...)``.

One line per event, JSON when the output is not a terminal and readable colour lines
when it is. Every line written while a request is served carries that request's trace
id, request id and uid, so logs join across services without handlers passing them.
The level can be changed while the process runs.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os
import select
import sys
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar, Token
from typing import IO, Any, cast

import orjson
import structlog
from opentelemetry import trace
from structlog.typing import EventDict, FilteringBoundLogger, WrappedLogger

from kiban import _propagation as propagation

__all__ = [
    "bind",
    "configure",
    "critical",
    "debug",
    "error",
    "exception",
    "get_level",
    "info",
    "set_level",
    "sink",
    "warning",
]

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
_METHOD_LEVELS = {
    "debug": 10,
    "info": 20,
    "warning": 30,
    "warn": 30,
    "error": 40,
    "exception": 40,
    "critical": 50,
    "fatal": 50,
    "msg": 20,
}


class Sink:
    """Where log lines go: one binary stream, written in whole lines by one thread.

    A line is appended to a buffer in memory, and only the sink's writer thread writes
    to the stream: every ``FLUSH_SECONDS``, at once for a warning or an error, or as
    soon as ``MAX_BUFFER`` bytes wait. So no request, and no probe, ever waits on the
    output: when stdout stops taking lines (a log collector or a disk that stalled, a
    pipe nobody reads) the writer blocks alone, the service goes on serving, and past
    ``max_held`` bytes held new lines are dropped, counted (``dropped``) and reported by
    a line of their own once the output takes lines again. A service whose logging
    blocks is one whose liveness probe fails when its log pipeline blinks.

    On a terminal (development) every line is written at once by its caller. Whatever
    is buffered is written at exit, waiting at most ``EXIT_SECONDS`` for a stalled
    output.
    """

    FLUSH_SECONDS = 0.1
    MAX_BUFFER = 64 * 1024
    #: How long ``flush`` waits by default for the writer to write what is buffered.
    EXIT_SECONDS = 2.0

    def __init__(self, stream: IO[bytes] | None = None, max_held: int = 4 * 1024 * 1024) -> None:
        self._stream = stream
        self.json = True
        self.immediate = False
        #: Bytes held (buffered, and being written) past which new lines are dropped.
        self.max_held = max_held
        #: Lines dropped because the output did not take them, since the start.
        self.dropped = 0
        #: Also handed every line, before it is buffered (the OTLP log exporter).
        self.tees: list[Callable[[bytes], None]] = []
        self._start_afresh()

    def _start_afresh(self) -> None:
        """The buffer and the writer's state, empty (a new sink, or a forked child's)."""
        self._unreported = 0  # dropped lines the output has not been told of yet
        self._gap = 0  # the offset in the buffer at which they were dropped
        # One growing bytearray, not a list of lines: each line's bytes are copied in and
        # freed at once, so the next line reuses memory still in cache.
        self._buffer = bytearray()
        self._writing_bytes = 0  # of the chunk the writer is writing now
        self._writing_since: float | None = None  # when that write began (monotonic)
        self._buffered_total = 0  # bytes ever buffered, and ever written: flush's marks
        self._written_total = 0
        self._lock = threading.Lock()  # the buffer and the counts
        self._written = threading.Condition(threading.Lock())  # a chunk was written
        self._output = threading.Lock()  # the stream: one chunk at a time, in order
        self._wake = threading.Event()
        self._writer: threading.Thread | None = None

    @property
    def stream(self) -> IO[bytes]:
        """The stream given, or the process's stdout *as it is now*.

        Resolved at each write rather than at import: a test runner that swaps
        ``sys.stdout`` to capture output gets kiban's lines too.
        """
        if self._stream is not None:
            return self._stream
        out = sys.stdout
        return cast("IO[bytes]", getattr(out, "buffer", out))

    @stream.setter
    def stream(self, value: IO[bytes] | None) -> None:
        self._stream = value

    def write(self, line: bytes, urgent: bool = False, newline: bool = True) -> None:
        """Write one line; ``newline=False`` when it already ends with one."""
        for tee in self.tees:
            tee(line if newline else line.rstrip(b"\n"))
        with self._lock:
            buffer = self._buffer
            if len(buffer) + self._writing_bytes >= self.max_held:
                self.dropped += 1
                if not self._unreported:
                    self._gap = len(buffer)  # where the report of the dropped lines goes
                self._unreported += 1
                return
            buffer += line
            if newline:
                buffer += b"\n"
            self._buffered_total += len(line) + newline
            if self._writer is None:
                self._start_writer()
            wake = urgent or len(buffer) >= self.MAX_BUFFER
        if self.immediate:
            self._write_buffered()
        elif wake:
            self._wake.set()

    def flush(self, timeout: float | None = None) -> bool:
        """Have what was written so far reach the stream (tests, shutdown, exit).

        Waits at most ``timeout`` seconds (``EXIT_SECONDS`` by default) for the writer,
        counted from when its current write began: a stalled output never holds the
        caller, and once a write has been stuck that long a flush no longer waits.
        Returns whether everything was written.
        """
        wait = self.EXIT_SECONDS if timeout is None else timeout
        with self._lock:
            mark = self._buffered_total
            if self._written_total >= mark and not self._unreported:
                return True
            if self._writer is None:
                self._start_writer()
            since = self._writing_since
        if since is not None:
            wait = max(0.0, min(wait, since + wait - time.monotonic()))
        self._wake.set()
        with self._written:
            return self._written.wait_for(lambda: self._written_total >= mark, wait)

    def _write_buffered(self) -> None:
        """Write what is buffered now, and the count of lines dropped before it."""
        with self._output:
            with self._lock:
                data, self._buffer = self._buffer, bytearray()
                mark = self._buffered_total
                dropped, self._unreported = self._unreported, 0
                gap = self._gap
                self._writing_bytes = len(data)
                self._writing_since = time.monotonic()
            if dropped:  # told where it happened: after the lines buffered before
                data[gap:gap] = self._dropped_line(dropped)
            try:
                if data:
                    _put(self.stream, data)
            except (ValueError, OSError):  # closed or broken stream: drop, never raise
                pass
            finally:
                with self._lock:
                    self._writing_bytes = 0
                    self._writing_since = None
                with self._written:
                    self._written_total = mark
                    self._written.notify_all()

    def _dropped_line(self, count: int) -> bytes:
        """The line that says ``count`` lines were dropped, in the output's format."""
        event = "log lines dropped: the output did not take them"
        if not self.json:
            return f"[warning  ] {event} dropped={count}\n".encode()
        record: dict[str, Any] = {
            "msg": event,
            "dropped": count,
            "level": "warning",
            "time": datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z"),
        }
        if _state.service:
            record["service"] = _state.service
        return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)

    def _start_writer(self) -> None:
        def run() -> None:
            while True:
                self._wake.wait(self.FLUSH_SECONDS)
                self._wake.clear()
                if self._buffer or self._unreported:
                    self._write_buffered()

        self._writer = threading.Thread(target=run, name="kiban-log-writer", daemon=True)
        self._writer.start()

    def _forked(self) -> None:
        """In a forked child: the parent's writer thread is not there; lines of the
        parent still buffered are the parent's to write."""
        self._start_afresh()


def _put(stream: IO[bytes], data: bytearray) -> None:
    """Write ``data`` whole. To a file descriptor (stdout) directly, past Python's own
    buffer: a write blocked on a stalled pipe then holds no lock of Python's, which the
    interpreter's exit would wait on, and abort (a daemon thread's ``BufferedWriter``).
    What the app prints keeps Python's buffering and is not ordered with log lines."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # not a file: a test's BytesIO
        stream.write(data)
        stream.flush()
        return
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:  # a non-blocking descriptor: wait until it takes more
            select.select([], [fd], [])


sink = Sink()
atexit.register(sink.flush)
os.register_at_fork(after_in_child=sink._forked)


class _State:
    """Process-wide log settings, read by the processors on every line."""

    level = _LEVELS["info"]
    colours = False
    service: str | None = None
    #: Whether a request's debug header may lower the level for that request.
    request_debug = False


_state = _State()


def set_level(level: str) -> None:
    """Change the minimum level of application log lines at runtime."""
    _state.level = _LEVELS[level.lower()]
    logging.getLogger().setLevel(_state.level)


def get_level() -> str:
    return next(name for name, value in _LEVELS.items() if value == _state.level)


def _filter_level(_: WrappedLogger, method: str, event: EventDict) -> EventDict:
    if _METHOD_LEVELS.get(method, 20) < _state.level:
        context = propagation.current() if _state.request_debug else None
        if context is None or not context.debug:
            raise structlog.DropEvent
    return event


def allow_request_debug(allowed: bool) -> None:
    """Let a request's debug header turn on debug lines for that request."""
    _state.request_debug = allowed


def span_id() -> str | None:
    """The current span's id in W3C form, for log and access lines (None outside a span)."""
    span = trace.get_current_span().get_span_context()
    return format(span.span_id, "016x") if span.is_valid else None


def _add_request_context(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    context = propagation.current()
    if context is not None:
        event.setdefault("trace_id", context.trace_id)
        span = span_id()
        if span is not None:
            event.setdefault("span_id", span)
        event.setdefault("request_id", context.request_id)
        if context.uid is not None:
            event.setdefault("uid", context.uid)
    return event


def _dumps(event: EventDict, **_: Any) -> bytes:
    return orjson.dumps(event, default=repr)


class Buffered:
    """A request's info and debug lines, held until it is known whether it failed.

    Clue's log buffering (``LOG_BUFFERING``): a request that succeeds writes only its
    access line; one that fails (a 5xx, an exception, an error logged) writes every
    line it logged, in order, as if they had never been held. At most ``limit`` lines
    are held; those past it are counted as dropped.
    """

    __slots__ = ("dropped", "keep", "limit", "lines")

    def __init__(self, limit: int = 200) -> None:
        self.lines: list[bytes] = []
        self.limit = limit
        self.keep = False
        self.dropped = 0

    def hold(self, line: bytes) -> None:
        if len(self.lines) < self.limit:
            self.lines.append(line)
        else:
            self.dropped += 1

    def release(self, keep: bool) -> int:
        """Write the held lines (``keep``) or drop them; how many were dropped."""
        lines, self.lines = self.lines, []
        if keep or self.keep:
            for line in lines:
                sink.write(line)
            return self.dropped
        return self.dropped + len(lines)


_buffered: ContextVar[Buffered | None] = ContextVar("kiban_log_buffer", default=None)


def hold_lines(limit: int = 200) -> tuple[Buffered, Token[Buffered | None]]:
    """Hold the current request's info and debug lines (``release`` them at its end)."""
    buffered = Buffered(limit)
    return buffered, _buffered.set(buffered)


def stop_holding(token: Token[Buffered | None]) -> None:
    _buffered.reset(token)


def _encoded(message: str | bytes) -> bytes:
    return message if isinstance(message, bytes) else message.encode("utf-8")


class _SinkLogger:
    """structlog's final logger: hands the rendered line to the shared sink."""

    def msg(self, message: str | bytes) -> None:
        buffered = _buffered.get()
        if buffered is not None and not buffered.keep:
            buffered.hold(_encoded(message))
            return
        sink.write(_encoded(message))

    def urgent(self, message: str | bytes) -> None:
        """Warnings wake the writer at once: they matter most when things go wrong."""
        sink.write(_encoded(message), True)

    def failing(self, message: str | bytes) -> None:
        """An error: the request is failing, so what it held is written first."""
        buffered = _buffered.get()
        if buffered is not None and not buffered.keep:
            buffered.keep = True
            buffered.release(True)
        sink.write(_encoded(message), True)

    debug = info = log = msg
    warning = warn = urgent
    error = exception = critical = fatal = failing


class _StdlibBridge(logging.Handler):
    """Sends records of stdlib loggers (uvicorn, SQLAlchemy, ...) through the same pipeline."""

    def emit(self, record: logging.LogRecord) -> None:
        method = record.levelname.lower()
        if method not in _METHOD_LEVELS:
            method = "info"
        kwargs: dict[str, Any] = {"logger": record.name}
        if record.exc_info:
            kwargs["exc_info"] = record.exc_info
        try:
            getattr(_logger, method)(record.getMessage(), **kwargs)
        except Exception:  # a broken record must not break the caller
            self.handleError(record)


_json_render = structlog.processors.JSONRenderer(serializer=_dumps)
_rename = structlog.processors.EventRenamer("msg")
_tracebacks = structlog.processors.format_exc_info  # a string; never frame locals
#: Console lines (a terminal, or LOG_FORMAT=console): coloured only on a terminal and
#: never under ``NO_COLOR`` (no-color.org). ``configure`` chooses.
_renderers = {colours: structlog.dev.ConsoleRenderer(colors=colours) for colours in (True, False)}


def _add_service(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    if _state.service:
        event.setdefault("service", _state.service)
    return event


def _render(logger: WrappedLogger, method: str, event: EventDict) -> str | bytes:
    """JSON or console, decided per line, so reconfiguring affects loggers already made."""
    if sink.json:
        rendered = _json_render(
            logger, method, _rename(logger, method, _tracebacks(logger, method, event))
        )
        return rendered
    return _renderers[_state.colours](logger, method, event)


#: kiban's pipeline. kiban's own logger uses it without touching structlog's global
#: configuration; ``configure`` makes it the global one only if the host has none.
PROCESSORS: list[Any] = [
    _filter_level,
    structlog.contextvars.merge_contextvars,
    _add_request_context,
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True, key="time"),
    _add_service,
    _render,
]


def _is_terminal(stream: IO[bytes]) -> bool:
    try:
        return stream.isatty()
    except ValueError:  # closed
        return False


def configure(
    level: str = "info",
    fmt: str = "auto",
    stream: IO[bytes] | None = None,
    service: str | None = None,
    structlog_global: bool = False,
    max_held: int | None = None,
) -> None:
    """Set up logging for the process: level, JSON or console lines, the service.

    ``stream`` (binary) replaces where lines go; by default the process's stdout.
    ``max_held`` bounds the bytes held while the output does not take them
    (``LOG_MAX_HELD_BYTES``): past it, lines are dropped and counted.
    structlog's global configuration becomes kiban's pipeline unless the host app set
    its own (then ``structlog_global=True`` overrides it): importing kiban changes
    nothing of the host's logging.
    """
    if stream is not None:
        sink.flush()
        sink.stream = stream
    if max_held is not None:
        sink.max_held = max_held
    terminal = _is_terminal(sink.stream)
    sink.json = fmt == "json" or (fmt == "auto" and not terminal)
    sink.immediate = terminal
    _state.colours = terminal and not os.environ.get("NO_COLOR")
    _state.service = service
    root = logging.getLogger()
    if not any(isinstance(handler, _StdlibBridge) for handler in root.handlers):
        root.addHandler(_StdlibBridge())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True
    # httpx logs every request with its full URL at info: noisy, and URLs can hold secrets.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    set_level(level)
    if structlog_global or not structlog.is_configured():
        # A host app that configured structlog keeps its own configuration.
        structlog.configure(
            processors=PROCESSORS,
            logger_factory=lambda *_: _SinkLogger(),
            wrapper_class=structlog.make_filtering_bound_logger(logging.NOTSET),
            cache_logger_on_first_use=True,
        )


_logger: FilteringBoundLogger = structlog.wrap_logger(
    _SinkLogger(),
    processors=PROCESSORS,
    wrapper_class=structlog.make_filtering_bound_logger(logging.NOTSET),
    cache_logger_on_first_use=True,
).bind()

# The module is the logger: ``from kiban import log; log.info("message", key=value)``.
debug = _logger.debug
info = _logger.info
warning = _logger.warning
error = _logger.error
exception = _logger.exception
critical = _logger.critical
bind = _logger.bind
