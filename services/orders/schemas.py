"""What the orders API accepts and answers."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from kiban.database import UTCDateTime
from services.common import Label

Item = Label


class OrderIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    member_id: int = Field(ge=1, le=2**31 - 1)
    item: Item
    quantity: int = Field(ge=1, le=1000)


class OrderOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    member_id: int
    member_name: str | None = None
    item: str
    quantity: int
    created_at: UTCDateTime


class OrderPage(BaseModel):
    items: list[OrderOut]
    total: int
    limit: int
    offset: int
