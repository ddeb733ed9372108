"""What the orders API accepts and answers."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

Item = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]


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
    created_at: datetime


class OrderPage(BaseModel):
    items: list[OrderOut]
    total: int
    limit: int
    offset: int
