"""The members service as orders sees it, through the generated typed client."""

from __future__ import annotations

import httpx

import kiban
from services.orders.members_client import Client
from services.orders.members_client.api.members import get_member
from services.orders.members_client.models import MemberOut


class Members:
    def __init__(self, http: httpx.AsyncClient, base_url: str) -> None:
        self.client = Client(base_url=base_url)
        # The kiban client: every call carries the request context to members.
        self.client.set_async_httpx_client(http)

    async def get(self, member_id: int) -> MemberOut:
        """The member, or a problem the caller can answer with as is."""
        try:
            response = await get_member.asyncio_detailed(member_id, client=self.client)
        except ValueError:  # members answered with something that is not JSON
            raise kiban.Problem(503, "The members service answered badly.") from None
        if isinstance(response.parsed, MemberOut):
            return response.parsed
        if response.status_code == 404:
            raise kiban.Problem(404, f"No member has id {member_id}.")
        kiban.log.warning("members call failed", status=int(response.status_code))
        raise kiban.Problem(
            503, "The members service is unavailable.", headers={"retry-after": "1"}
        )
