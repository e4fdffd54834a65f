"""Route handlers: parse the request, call one domain function, shape the response.

``ROUTES`` is the whole HTTP surface (method, path, handler, access); ``init_app`` registers
it and ``feedsvc.api.openapi`` documents exactly these routes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from datetime import UTC, datetime

import msgspec
from aiohttp import web

from feedsvc import graph, intake, timeline
from feedsvc.api.app import RUNTIME, Access, Handler, error_response, json_response
from feedsvc.api.openapi import spec
from feedsvc.api.params import inbox_owner, path_id, query_limit, read_body
from feedsvc.errors import (
    InvalidRequest,
    RetryableError,
    Unprocessable,
)
from feedsvc.model import (
    CURSOR_PATTERN,
    MAX_BODY_BYTES,
    MAX_BULK_BODY_BYTES,
    BulkIn,
    BulkOut,
    IdPageOut,
    InboxEntryOut,
    InboxItem,
    Mode,
    PageOut,
    UserOut,
)


def rfc3339(ms: int) -> str:
    moment = datetime.fromtimestamp(ms // 1000, UTC)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{ms % 1000:03d}Z"


_CURSOR = re.compile(CURSOR_PATTERN)


def _cursor(request: web.Request) -> str | None:
    """The ``cursor`` query parameter, checked against the documented pattern."""
    raw = request.query.get("cursor")
    if raw is None:
        return None
    if not _CURSOR.search(raw):
        raise InvalidRequest("cursor is not one this API returned", code="invalid_cursor",
                             field="cursor")
    return raw


def _opaque(text: str | None) -> str | None:
    """Encode a store continuation as a URL-safe cursor (unpadded base64)."""
    if text is None:
        return None
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _unopaque(request: web.Request) -> str | None:
    raw = _cursor(request)
    if raw is None:
        return None
    try:
        return base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()
    except (binascii.Error, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise InvalidRequest("cursor is not one this API returned", code="invalid_cursor",
                             field="cursor") from exc


# --- events ----------------------------------------------------------------------------


async def post_event(request: web.Request) -> web.Response:
    raw = await read_body(request, MAX_BODY_BYTES)
    status, body = await intake.accept(request.app[RUNTIME], raw)
    return json_response(body, status)


async def author_events(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    author_id = path_id(request, "user_id")
    limit = query_limit(request, 50, 200)
    cursor = _cursor(request)
    before = timeline.decode_cursor(cursor).position if cursor else None
    since = rt.now_ms() - rt.settings.retention_ms
    if author_id in await rt.erased.get(rt):
        return json_response(PageOut([], None))
    items = await rt.store.author_events(author_id, before, limit + 1, since)
    more = len(items) > limit
    items = items[:limit]
    next_cursor = (
        timeline.encode_cursor(timeline.Cursor(items[-1].created_at, items[-1].event_id))
        if more else None
    )
    return json_response(PageOut([_entry(i, "push") for i in items], next_cursor))


def _entry(item: InboxItem, via: timeline.Via) -> InboxEntryOut:
    return InboxEntryOut(
        event_id=item.event_id, author_id=item.author_id, kind=item.kind,
        created_at=rfc3339(item.created_at), priority=item.priority, object_id=item.object_id,
        payload=msgspec.Raw(item.payload.encode()), via=via,
    )


# --- inbox -----------------------------------------------------------------------------


async def get_inbox(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    user_id = inbox_owner(request)
    limit = query_limit(request, 50, 200)
    raw_cursor = _cursor(request)
    cursor = timeline.decode_cursor(raw_cursor) if raw_cursor else None
    page = await timeline.read_inbox(rt, user_id, limit, cursor)
    erased = await rt.erased.get(rt)  # their rows may still be on the way out
    return json_response(PageOut([_entry(i, via) for i, via in page.items
                                  if i.author_id not in erased], page.next_cursor))


# --- follow graph ----------------------------------------------------------------------


async def put_following(request: web.Request) -> web.Response:
    await graph.follow(request.app[RUNTIME], path_id(request, "user_id"),
                       path_id(request, "author_id"))
    return web.Response(status=204)


async def delete_following(request: web.Request) -> web.Response:
    await graph.unfollow(request.app[RUNTIME], path_id(request, "user_id"),
                         path_id(request, "author_id"))
    return web.Response(status=204)


async def post_bulk(request: web.Request) -> web.Response:
    raw = await read_body(request, MAX_BULK_BODY_BYTES)
    body, _ = intake.decode_body(raw, BulkIn)
    pairs = []
    for i, f in enumerate(body.follows):
        if f.user_id == f.author_id:
            raise Unprocessable("a user cannot follow themselves", code="self_follow",
                                field=f"follows[{i}]")
        pairs.append((f.user_id, f.author_id))
    applied = await graph.follow_many(request.app[RUNTIME], pairs)
    return json_response(BulkOut(applied))


async def get_user(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    user_id = path_id(request, "user_id")
    (followers, following), mode = await _counts_and_mode(request, user_id)
    celebrity = graph.next_mode(mode, followers, rt.settings.celebrity_threshold) == "pull"
    return json_response(UserOut(user_id, followers, following, celebrity))


async def _counts_and_mode(request: web.Request, user_id: str) -> tuple[tuple[int, int], Mode]:
    store = request.app[RUNTIME].store
    return await asyncio.gather(store.counts(user_id), store.get_mode(user_id))


async def get_followers(request: web.Request) -> web.Response:
    store = request.app[RUNTIME].store
    ids, after = await store.followers_page(
        path_id(request, "user_id"), _unopaque(request), query_limit(request, 100, 1000)
    )
    return json_response(IdPageOut(ids, _opaque(after)))


async def get_following(request: web.Request) -> web.Response:
    store = request.app[RUNTIME].store
    ids, after = await store.following_page(
        path_id(request, "user_id"), _unopaque(request), query_limit(request, 100, 1000)
    )
    return json_response(IdPageOut(ids, _opaque(after)))


# --- operations ------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when the store and the queue answer and this process's in-process workers
    (``feedsvc serve``) are alive; a Redis outage does make it unready although intake
    still accepts events (the outbox), since nothing is fanned out meanwhile."""
    rt = request.app[RUNTIME]
    try:
        await rt.store.ping()
        await rt.queue.ping()
    except RetryableError as exc:
        return error_response(503, "not_ready", str(exc), headers={"Retry-After": "1"})
    problem = rt.health.problem()
    if problem is not None:
        return error_response(503, "not_ready", problem)
    return json_response({"status": "ready"})


async def openapi(request: web.Request) -> web.Response:
    return json_response(spec())


ROUTES: list[tuple[str, str, Handler, Access]] = [
    ("POST", "/v1/events", post_event, "service"),
    ("GET", "/v1/inbox", get_inbox, "any"),
    ("PUT", "/v1/users/{user_id}/following/{author_id}", put_following, "service"),
    ("DELETE", "/v1/users/{user_id}/following/{author_id}", delete_following, "service"),
    ("POST", "/v1/follows/bulk", post_bulk, "service"),
    ("GET", "/v1/users/{user_id}", get_user, "service"),
    ("GET", "/v1/users/{user_id}/followers", get_followers, "service"),
    ("GET", "/v1/users/{user_id}/following", get_following, "service"),
    ("GET", "/v1/users/{user_id}/events", author_events, "any"),
    ("GET", "/healthz", healthz, "none"),
    ("GET", "/readyz", readyz, "none"),
    ("GET", "/openapi.json", openapi, "none"),
]
