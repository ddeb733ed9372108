"""The orders HTTP API."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request

import kiban
from kiban.database import Session
from kiban.security import owns, principal
from services.orders.members import Members
from services.orders.repository import OrderRepository
from services.orders.schemas import OrderIn, OrderOut, OrderPage

router = APIRouter(prefix="/orders", tags=["orders"])

_meter = kiban.meter("orders")
orders_total = _meter.create_counter("orders", unit="{order}", description="Orders placed.")
order_latency = _meter.create_histogram(
    "order.duration", unit="s", description="Time to place an order, member check included."
)


async def repository(session: Session) -> OrderRepository:
    """The repository in the request's transaction, committed before the response starts.

    ``async`` though it awaits nothing: FastAPI runs a plain ``def`` dependency on a
    worker thread, a thread hop on every request for a constructor call.
    """
    return OrderRepository(session)


async def members(request: Request) -> Members:
    return request.app.state.members  # type: ignore[no-any-return]


Repo = Annotated[OrderRepository, Depends(repository)]
OrderId = Annotated[int, Path(ge=1, le=2**31 - 1)]
MembersDep = Annotated[Members, Depends(members)]


#: Held by operators' identity tokens: they may see and place anyone's orders.
ADMIN = "orders:admin"


@router.post("", status_code=201, response_model=OrderOut)
async def place_order(body: OrderIn, repo: Repo, members: MembersDep) -> OrderOut:
    if not owns(body.member_id, or_scope=ADMIN):  # a member orders for themselves only
        raise kiban.Problem(403, "You can only place orders for yourself.")
    started = time.perf_counter()
    outcome = "failed"
    try:
        member = await members.get(body.member_id)
        order = await repo.add(body.member_id, body.item, body.quantity)
        outcome = "placed"
    finally:
        orders_total.add(1, {"outcome": outcome})
        order_latency.record(time.perf_counter() - started, {"outcome": outcome})
    kiban.log.info("order placed", order_id=order.id, member_id=member.id)
    return OrderOut.model_validate(order).model_copy(update={"member_name": member.name})


@router.get("/{order_id:int}", response_model=OrderOut)
async def get_order(order_id: OrderId, repo: Repo) -> OrderOut:
    order = await repo.get(order_id)
    if order is None or not owns(order.member_id, or_scope=ADMIN):  # not yours: not there
        raise kiban.Problem(404, f"No order has id {order_id}.")
    return OrderOut.model_validate(order)


@router.get("", response_model=OrderPage)
async def list_orders(
    repo: Repo,
    member_id: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> OrderPage:
    """A member's own orders; an admin's choice of member, or everyone's."""
    if not owns(member_id, or_scope=ADMIN):
        who = principal()
        assert who is not None  # the router requires an identity token
        if member_id is not None or not who.subject.isdigit():
            raise kiban.Problem(403, "You can only list your own orders.")
        member_id = int(who.subject)
    rows, total = await repo.page(member_id, limit, offset)
    return OrderPage(
        items=[OrderOut.model_validate(row) for row in rows],
        total=total,
        limit=limit,
        offset=offset,
    )
