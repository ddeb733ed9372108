"""Request bodies: a size limit counted on the bytes received, and sound JSON text.

A Content-Length over the limit is refused before the body is read; a chunked or
lying body is cut off as soon as the bytes received pass the limit. A JSON body with a
lone UTF-16 surrogate escape (``"\\ud800"``) is refused with 400: Python's json module
accepts it, but the string can be neither stored as UTF-8 nor sent back, so it would
otherwise surface as a 500 far from its cause.
"""

from __future__ import annotations

import re

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["BodyLimitMiddleware", "has_lone_surrogate"]

_SURROGATE_ESCAPE = re.compile(rb"(\\+)u([dD][89a-fA-F][0-9a-fA-F]{2})")


def has_lone_surrogate(body: bytes) -> bool:
    """Whether JSON text escapes a surrogate that is not half of a pair."""
    if b"\\u" not in body:
        return False
    paired_low_at = -1
    for match in _SURROGATE_ESCAPE.finditer(body):
        if len(match.group(1)) % 2 == 0:
            continue  # an escaped backslash followed by plain "u...": not an escape
        backslash = match.end(1) - 1
        code = int(match.group(2), 16)
        if code <= 0xDBFF:  # high: a low escape must follow at once
            following = body[match.end() : match.end() + 6]
            if not re.fullmatch(rb"\\u[dD][c-fC-F][0-9a-fA-F]{2}", following):
                return True
            paired_low_at = match.end()
        elif backslash != paired_low_at:  # low without its high
            return True
    return False


def _is_json(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"content-type":
            return b"json" in value.lower()
    return False


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"The request body is larger than {limit} bytes.")


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.limit = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit():
                    raise HTTPException(400, "The Content-Length header is not a number.")
                if int(value) > self.limit:
                    raise BodyTooLarge(self.limit)
                break
        received = 0
        json_body = bytearray() if _is_json(scope) else None

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                received += len(chunk)
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
                if json_body is not None:
                    json_body.extend(chunk)
                    if not message.get("more_body") and has_lone_surrogate(bytes(json_body)):
                        raise HTTPException(400, "The JSON body has an unpaired surrogate escape.")
            return message

        await self.app(scope, limited_receive, send)
