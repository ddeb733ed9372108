"""The one place kiban reaches into uvicorn: its HTTP protocol, behind a version bound.

uvicorn has no option for a request-head deadline (slowloris) or for a head size
limit that holds however the head is split across reads, and answers what its parser
refuses in plain text. ``HttpProtocol`` adds the three to uvicorn's httptools
protocol, overriding its parser callbacks; ``Config`` carries the two settings.
pyproject.toml bounds uvicorn from above, and ``tests/test_server.py`` pins the
protocol's behaviour on the locked release. Everything else kiban
does with uvicorn goes through its public ``Config`` and ``Server``.
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from kiban import _log as log
from kiban._errors import problem_body

__all__ = ["Config", "HttpProtocol"]


class Config(uvicorn.Config):
    """uvicorn's config plus the limits uvicorn itself lacks."""

    def __init__(
        self, app: Any, *, read_header_timeout: float, max_header_bytes: int, **kwargs: Any
    ) -> None:
        super().__init__(app, **kwargs)
        self.read_header_timeout = read_header_timeout
        self.max_header_bytes = max_header_bytes


def _refusal(status: int, detail: str | None = None) -> bytes:
    """A problem+json answer the server writes itself, before any request exists."""
    body = problem_body(status, detail)  # outside any request: no trace id to add
    return (
        b"HTTP/1.1 %d %s\r\n" % (status, HTTPStatus(status).phrase.encode())
        + b"content-type: application/problem+json\r\n"
        + b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
        + body
    )


_HEADER_TOO_LARGE = _refusal(431)
#: What every request the HTTP parser refuses gets (bare LF, obs-fold, CL with TE, a bad
#: Content-Length, an invalid method, NUL in a header...): the parser's own message is
#: not repeated, it may quote the request.
_MALFORMED = _refusal(400, "The request is not valid HTTP/1.1.")


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a request-head deadline and a head size limit.

    Both are kept off the per-header path: the deadline is a start time that the
    server's tick (every 0.1 s) compares, not a timer per request, and the head is
    measured by the bytes received while it is incomplete, counted exactly (request
    line and headers) only when its last chunk could have taken it past the limit.
    """

    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self.read_header_timeout: float = getattr(config, "read_header_timeout", 10.0)
        self.max_header_bytes: int = getattr(config, "max_header_bytes", 16 * 1024)
        #: Loop time since which a request head has been awaited; None once it is in.
        self.head_since: float | None = None
        self._head_bytes = 0  # of the head being received, as of the last chunk: at least
        self._head_upper = 0  # of the head being received before this chunk: at most
        self._chunk = 0  # bytes of the chunk being parsed
        self._began = False  # a request head began in the chunk being parsed
        self._rejected = False

    def expire(self, now: float) -> None:
        """Close the connection if its request head is overdue (called by the server tick)."""
        if self.head_since is None or now - self.head_since < self.read_header_timeout:
            return
        self.head_since = None
        if not self.transport.is_closing():
            log.warning(
                "request head not received in time, closing connection",
                remote_addr=self.client[0] if self.client else None,
                timeout_s=self.read_header_timeout,
            )
            self.transport.close()

    def _parsed_head_bytes(self) -> int:
        """The request line and headers parsed so far, as they came in (names, values, CRLFs)."""
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)

    def _reject(self) -> None:
        self._rejected = True
        self.head_since = None
        self.transport.write(_HEADER_TOO_LARGE)
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.head_since = self.loop.time()

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            return
        self._chunk = len(data)
        self._began = False
        super().data_received(data)
        if self.head_since is not None and not self._rejected:  # a head is still incomplete
            # A head that began in this chunk is measured (the chunk may end a previous
            # request's body); a head that goes on counts the whole chunk.
            # Bounds, not counts: a header still arriving is not in the parsed ones, and
            # the bytes before the head (a body's tail) are not part of it.
            if self._began:
                self._head_bytes = self._parsed_head_bytes()
                self._head_upper = self._chunk
            else:
                self._head_bytes += self._chunk
                self._head_upper += self._chunk
            if self._head_bytes > self.max_header_bytes:
                self._reject()

    def send_400_response(self, msg: str) -> None:
        """uvicorn answers a request its parser refuses in plain text; kiban in problem+json."""
        if not self._rejected:  # else the 431 was sent already
            self._rejected = True
            self.head_since = None
            self.transport.write(_MALFORMED)
            self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        self._head_upper = 0
        self._began = True
        if self.head_since is None:  # a connection's first head is timed from its connect
            self.head_since = self.loop.time()

    def on_headers_complete(self) -> None:
        self.head_since = None
        # Measured exactly (every header is in) when the head could be past the limit:
        # however its bytes were split across reads, the upper bound says so.
        if (
            self._head_upper + self._chunk > self.max_header_bytes
            and self._parsed_head_bytes() > self.max_header_bytes
        ):
            self._reject()
            raise ValueError("request head too large")  # stops the parser
        super().on_headers_complete()
