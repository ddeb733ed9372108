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
from starlette.types import Message

__all__ = ["Body", "BodyTooLarge", "check_length", "has_lone_surrogate"]

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


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"The request body is larger than {limit} bytes.")


def check_length(content_length: str | None, limit: int) -> None:
    """Refuse a declared Content-Length over the limit before reading any of the body."""
    if content_length is None:
        return
    if not content_length.isdigit():
        raise HTTPException(400, "The Content-Length header is not a number.")
    if int(content_length) > limit:
        raise BodyTooLarge(limit)


class Body:
    """Counts a request's body as it is received, cut off past the limit.

    A JSON body is kept until its last chunk to check it for lone surrogates.
    """

    __slots__ = ("json", "limit", "received")

    def __init__(self, limit: int, content_type: str | None) -> None:
        self.limit = limit
        self.received = 0
        self.json = bytearray() if content_type and "json" in content_type.lower() else None

    def take(self, message: Message) -> None:
        chunk = message.get("body", b"")
        self.received += len(chunk)
        if self.received > self.limit:
            raise BodyTooLarge(self.limit)
        if self.json is not None:
            self.json.extend(chunk)
            if not message.get("more_body") and has_lone_surrogate(bytes(self.json)):
                raise HTTPException(400, "The JSON body has an unpaired surrogate escape.")
