"""A typed async client of the feedsvc HTTP API, for posting services and scripts.

It speaks the same msgspec Structs as the server (``feedsvc.model``,
``feedsvc.delivery.recipients``), raises the classes of ``feedsvc.errors`` from the JSON
error body (a 422 is ``Unprocessable`` with its ``code`` and ``field``), and retries what
the API asks to be retried: ``503`` and ``429`` after their ``Retry-After``, and a
connection that failed. Every call the client makes is idempotent on the server (events
by ``event_id``, follows, PUTs), so a retry after a lost answer changes nothing.

::

    async with FeedClient("http://127.0.0.1:8080", credential=service_key) as feed:
        await feed.post_event(EventIn(event_id="e1", author_id="a", kind="post",
                                      payload={"text": "hi"}))
        async for page in feed.read_inbox(user_id="b"):
            ...
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Iterable
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
import msgspec

from feedsvc.delivery.recipients import (
    Contacts,
    ContactsIn,
    DeviceIn,
    DeviceList,
    DeviceOut,
    Preferences,
    PreferencesIn,
)
from feedsvc.errors import (
    ClientError,
    Forbidden,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    PermanentError,
    RequestTimeout,
    RetryableError,
    Unauthenticated,
    Unprocessable,
    UnsupportedMediaType,
)
from feedsvc.model import (
    Accepted,
    BulkIn,
    BulkOut,
    ErrorOut,
    EventIn,
    FollowIn,
    PageOut,
    UserOut,
)

T = TypeVar("T")

_BY_STATUS: dict[int, type[ClientError]] = {
    400: InvalidRequest, 401: Unauthenticated, 403: Forbidden, 404: NotFound,
    408: RequestTimeout, 413: PayloadTooLarge, 415: UnsupportedMediaType, 422: Unprocessable,
}
_RETRY_STATUSES = (429, 503)
_error_decoder = msgspec.json.Decoder(ErrorOut)


def _segment(value: str) -> str:
    return quote(value, safe="")


class FeedClient:
    """One API endpoint with one credential (a service key or a user token)."""

    def __init__(self, base_url: str, *, credential: str, retries: int = 5,
                 max_wait_s: float = 30.0, timeout_s: float = 30.0,
                 session: aiohttp.ClientSession | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self.max_wait_s = max_wait_s
        self.retried = 0  # requests sent again (after 503, 429 or a failed connection)
        self._headers = {"Authorization": f"Bearer {credential}"}
        self._own_session = session is None
        self._session = session or aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=timeout_s))

    async def __aenter__(self) -> FeedClient:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._own_session:
            await self._session.close()

    # --- events and the follow graph ----------------------------------------------------

    async def post_event(self, event: EventIn) -> Accepted:
        """``Accepted`` with status ``accepted`` (202) or ``duplicate`` (200)."""
        return await self._call("POST", "/v1/events", Accepted, body=event)

    async def follow(self, user_id: str, author_id: str) -> None:
        await self._call("PUT", f"/v1/users/{_segment(user_id)}/following/"
                         f"{_segment(author_id)}", None)

    async def unfollow(self, user_id: str, author_id: str) -> None:
        await self._call("DELETE", f"/v1/users/{_segment(user_id)}/following/"
                         f"{_segment(author_id)}", None)

    async def follow_bulk(self, pairs: Iterable[tuple[str, str]]) -> int:
        """Up to 10,000 follows in one request; returns how many edges were new."""
        body = BulkIn([FollowIn(user_id, author_id) for user_id, author_id in pairs])
        return (await self._call("POST", "/v1/follows/bulk", BulkOut, body=body)).applied

    async def user(self, user_id: str) -> UserOut:
        return await self._call("GET", f"/v1/users/{_segment(user_id)}", UserOut)

    # --- reading -------------------------------------------------------------------------

    async def inbox_page(self, *, user_id: str | None = None, limit: int = 50,
                         cursor: str | None = None) -> PageOut:
        """One page, newest first (``user_id`` is needed with a service key)."""
        params = {"limit": str(limit)}
        if user_id is not None:
            params["user_id"] = user_id
        if cursor is not None:
            params["cursor"] = cursor
        return await self._call("GET", "/v1/inbox", PageOut, params=params)

    async def read_inbox(self, *, user_id: str | None = None,
                         limit: int = 50) -> AsyncIterator[PageOut]:
        """Every page of the inbox, following ``next_cursor`` until the end."""
        cursor: str | None = None
        while True:
            page = await self.inbox_page(user_id=user_id, limit=limit, cursor=cursor)
            yield page
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    # --- recipients ------------------------------------------------------------------------

    async def put_device(self, user_id: str, device_id: str, device: DeviceIn) -> DeviceOut:
        return await self._call("PUT", f"/v1/users/{_segment(user_id)}/devices/"
                                f"{_segment(device_id)}", DeviceOut, body=device)

    async def delete_device(self, user_id: str, device_id: str) -> None:
        await self._call("DELETE", f"/v1/users/{_segment(user_id)}/devices/"
                         f"{_segment(device_id)}", None)

    async def devices(self, user_id: str) -> DeviceList:
        return await self._call("GET", f"/v1/users/{_segment(user_id)}/devices", DeviceList)

    async def put_contacts(self, user_id: str, contacts: ContactsIn) -> Contacts:
        return await self._call("PUT", f"/v1/users/{_segment(user_id)}/contacts", Contacts,
                                body=contacts)

    async def contacts(self, user_id: str) -> Contacts:
        return await self._call("GET", f"/v1/users/{_segment(user_id)}/contacts", Contacts)

    async def put_preferences(self, user_id: str, prefs: PreferencesIn) -> Preferences:
        return await self._call("PUT", f"/v1/users/{_segment(user_id)}/preferences",
                                Preferences, body=prefs)

    async def preferences(self, user_id: str) -> Preferences:
        return await self._call("GET", f"/v1/users/{_segment(user_id)}/preferences",
                                Preferences)

    # --- notifications ------------------------------------------------------------------

    async def opened(self, notification_id: str) -> None:
        """The user opened this notification (``event_id:user_id``; that user's token):
        its escalation sends nothing more."""
        await self._call("POST", f"/v1/notifications/{_segment(notification_id)}/opened", None)

    # --- the one request path ------------------------------------------------------------

    async def _call(self, method: str, path: str, into: type[T] | None, *,
                    body: msgspec.Struct | None = None,
                    params: dict[str, str] | None = None) -> T:
        data = msgspec.json.encode(body) if body is not None else None
        headers = dict(self._headers)
        if data is not None:
            headers["Content-Type"] = "application/json"
        attempt = 0
        while True:
            try:
                async with self._session.request(method, self.base_url + path, data=data,
                                                 params=params, headers=headers) as response:
                    raw = await response.read()
                    status, retry_after = response.status, response.headers.get("Retry-After")
            except (TimeoutError, aiohttp.ClientConnectionError) as exc:
                if attempt >= self.retries:
                    raise RetryableError(f"{method} {path}: {exc!r}") from exc
                attempt += 1
                self.retried += 1
                await asyncio.sleep(min(self.max_wait_s, random.uniform(0, 0.2 * 2 ** attempt)))
                continue
            if status < 300:
                result: Any = None if into is None else msgspec.json.decode(raw, type=into)
                return result  # type: ignore[no-any-return]
            if status in _RETRY_STATUSES and attempt < self.retries:
                attempt += 1
                self.retried += 1
                await asyncio.sleep(self._wait(retry_after, attempt))
                continue
            raise self._error(status, raw, f"{method} {path}")

    def _wait(self, retry_after: str | None, attempt: int) -> float:
        """The server's Retry-After (seconds) if it gave one, else a jittered backoff."""
        if retry_after is not None and retry_after.isdigit():
            return min(self.max_wait_s, float(retry_after))
        return min(self.max_wait_s, random.uniform(0, 0.2 * 2 ** attempt))

    @staticmethod
    def _error(status: int, raw: bytes, what: str) -> Exception:
        try:
            body = _error_decoder.decode(raw).error
            code, message, field = body.code, body.message, body.field
        except msgspec.MsgspecError:
            code, message, field = "http_error", raw[:200].decode(errors="replace"), None
        if status in _RETRY_STATUSES:
            return RetryableError(f"{what}: {status} {code}: {message}")
        kind = _BY_STATUS.get(status)
        if kind is not None:
            return kind(message, code=code, field=field)
        if 400 <= status < 500:
            return InvalidRequest(message, code=code, field=field)
        return PermanentError(f"{what}: {status} {code}: {message}")
