"""What the members API accepts and answers."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, StringConstraints

from kiban.database import UTCDateTime
from services.common import Label

Name = Label
#: One @, something before it, a dot after it, no spaces: what the schema says is what
#: is accepted (no hidden rule such as refusing reserved domains).
_PART = r"[^@\u0000-\u0020\u007f]+"
Email = Annotated[
    str, StringConstraints(min_length=3, max_length=254, pattern=rf"^{_PART}@{_PART}\.{_PART}$")
]


class MemberIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: Email
    name: Name


class MemberPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: Email | None = None
    name: Name | None = None


class MemberOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    email: str
    name: str
    created_at: UTCDateTime
    updated_at: UTCDateTime


class MemberPage(BaseModel):
    items: list[MemberOut]
    total: int
    limit: int
    offset: int
