"""A thin test client for the HTTP API: one method per call the tests make."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient

from feedsvc.auth import issue_token
from feedsvc.runtime import Runtime
from feedsvc.workers import drain
from tests.conftest import JWT_SECRET, SERVICE_KEY


class Api:
    def __init__(self, client: TestClient[Any, Any], rt: Runtime, prefix: str) -> None:
        self.client, self.rt, self.prefix = client, rt, prefix
        self.service = {"Authorization": f"Bearer {SERVICE_KEY}"}
        self.json = {**self.service, "Content-Type": "application/json"}
        self._seq = 0

    def user(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def token(self, user_id: str, ttl_s: int = 600) -> dict[str, str]:
        return {"Authorization": f"Bearer {issue_token(JWT_SECRET, user_id, ttl_s)}"}

    async def post(self, author: str, **fields: Any) -> tuple[int, dict[str, Any]]:
        self._seq += 1
        body = {"event_id": f"{self.prefix}-e{self._seq}", "author_id": author,
                "kind": "post", "payload": {"n": self._seq}}
        body.update(fields)
        response = await self.client.post("/v1/events", json=body, headers=self.service)
        return response.status, await response.json()

    async def post_ok(self, author: str, **fields: Any) -> str:
        status, body = await self.post(author, **fields)
        assert status == 202, body
        event_id: str = body["event_id"]
        return event_id

    async def follow(self, user: str, author: str) -> None:
        response = await self.client.put(f"/v1/users/{user}/following/{author}",
                                         headers=self.service)
        assert response.status == 204, await response.text()

    async def unfollow(self, user: str, author: str) -> None:
        response = await self.client.delete(f"/v1/users/{user}/following/{author}",
                                            headers=self.service)
        assert response.status == 204, await response.text()

    async def bulk(self, pairs: list[tuple[str, str]]) -> int:
        response = await self.client.post(
            "/v1/follows/bulk", headers=self.service,
            json={"follows": [{"user_id": u, "author_id": a} for u, a in pairs]})
        assert response.status == 200, await response.text()
        applied: int = (await response.json())["applied"]
        return applied

    async def page(self, user: str, limit: int = 50,
                   cursor: str | None = None) -> dict[str, Any]:
        params = {"limit": str(limit)}
        if cursor:
            params["cursor"] = cursor
        response = await self.client.get("/v1/inbox", params=params, headers=self.token(user))
        assert response.status == 200, await response.text()
        body: dict[str, Any] = await response.json()
        return body

    async def inbox(self, user: str, limit: int = 50) -> list[dict[str, Any]]:
        """Every item across all pages, asserting each page is full unless it is the last."""
        items: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            body = await self.page(user, limit, cursor)
            items += body["items"]
            cursor = body["next_cursor"]
            if cursor is None:
                return items
            assert len(body["items"]) == limit

    async def inbox_ids(self, user: str, limit: int = 50) -> list[str]:
        return [i["event_id"] for i in await self.inbox(user, limit)]

    async def drain(self) -> int:
        return await drain(self.rt)

    async def rows(self, user: str) -> list[str]:
        """The raw inbox rows in the store (not the merged read)."""
        return [i.event_id for i in await self.rt.store.read_inbox(user, None, 10_000)]
