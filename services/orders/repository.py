"""Orders storage: the only module that speaks SQL."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from services.orders.models import Order


class OrderRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, member_id: int, item: str, quantity: int) -> Order:
        order = Order(member_id=member_id, item=item, quantity=quantity)
        self.session.add(order)
        await self.session.flush()
        await self.session.refresh(order)
        return order

    async def get(self, order_id: int) -> Order | None:
        return await self.session.get(Order, order_id)

    async def page(
        self, member_id: int | None, limit: int, offset: int
    ) -> tuple[Sequence[Order], int]:
        query = select(Order)
        count = select(func.count()).select_from(Order)
        if member_id is not None:
            query = query.where(Order.member_id == member_id)
            count = count.where(Order.member_id == member_id)
        total = await self.session.scalar(count)
        rows = await self.session.scalars(query.order_by(Order.id).limit(limit).offset(offset))
        return rows.all(), total or 0
