"""Inbox read state: what a user has seen, and the unread badge.

Where it sits: beside the read merge (``feedsvc/timeline.py``), which it calls only
through ``read_inbox`` and ``decode_cursor``. ``POST /v1/inbox/seen {"up_to": ...}``
moves the user's mark (``ReadMarks``) to a position in newest-first order: an event id
(the event's own position) or a cursor ``GET /v1/inbox`` returned (the position of the
last item of that page). Everything at or older than the mark is seen; the mark only
moves forward.

``GET /v1/inbox/unread_count`` counts what ``GET /v1/inbox`` would show newer than the
mark: pushed rows, **celebrity events pulled at read time** and direct events alike,
de-duplicated and collapsed by object id exactly as the inbox shows them, leaving out the
reader's own events and erased users' events. The count stops at ``UNREAD_CAP`` (99):
``{"count": 99, "capped": true}`` means more than 99, a "99+" badge. A celebrity event
dated before the mark counts as seen, even if the reader followed that author after
setting it (the mark is a place in time, not a list of ids).

Cost: a badge poll first reads a 10-item inbox page (the same queries as a small inbox
read); only when all 10 are unread does it read on, up to 100 items. A reader who keeps
up pays one small merged read per poll.
"""

from __future__ import annotations

import asyncio
import re
from typing import Annotated

import msgspec

from feedsvc import timeline
from feedsvc.errors import InvalidRequest, Unprocessable
from feedsvc.model import EVENT_ID_PATTERN, Position
from feedsvc.runtime import Runtime

UNREAD_CAP = 99
FIRST_LOOK = 10  # items read first: most polls end here
MAX_PAGE = 100
SCAN_CAP = 200  # items a poll looks at, at most; past it the count is a lower bound
_EVENT_ID = re.compile(EVENT_ID_PATTERN)


class SeenIn(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /v1/inbox/seen``: an event id, or a cursor ``GET /v1/inbox`` returned."""

    up_to: Annotated[str, msgspec.Meta(min_length=1, max_length=2048)]


class UnreadOut(msgspec.Struct):
    """The unread badge: ``capped`` true means more than ``count`` (show "99+")."""

    count: int
    capped: bool


def newer(a: Position, b: Position) -> bool:
    """Is ``a`` after ``b`` in newest-first order (newer, or as new with a greater id)?"""
    return (a.created_at, a.event_id) > (b.created_at, b.event_id)


async def position_of(rt: Runtime, up_to: str) -> Position:
    """The position ``up_to`` names: a stored event's, else a cursor's; 422 if neither."""
    if _EVENT_ID.search(up_to):
        event = await rt.store.get_event(up_to)
        if event is not None:
            return Position(event.created_at, event.event_id)
    try:
        return timeline.decode_cursor(up_to).position
    except InvalidRequest:
        raise Unprocessable("up_to must be the id of an event or a cursor GET /v1/inbox "
                            "returned", code="invalid_field", field="up_to") from None


async def mark_seen(rt: Runtime, user_id: str, up_to: str) -> UnreadOut:
    """Move the user's mark forward to ``up_to`` (never back); returns the badge after."""
    position, current = await asyncio.gather(position_of(rt, up_to),
                                             rt.policy.reads.seen(user_id))
    if current is None or newer(position, current):
        await rt.policy.reads.mark_seen(user_id, position)
    return await unread_count(rt, user_id)


async def unread_count(rt: Runtime, user_id: str) -> UnreadOut:
    """Items of the merged inbox newer than the user's mark, up to ``UNREAD_CAP``."""
    seen, erased = await asyncio.gather(rt.policy.reads.seen(user_id), rt.erased.get(rt))
    count, cursor, limit, scanned = 0, None, FIRST_LOOK, 0
    while True:
        page = await timeline.read_inbox(rt, user_id, limit, cursor)
        for item, _ in page.items:
            if seen is not None and not newer(Position(item.created_at, item.event_id), seen):
                return UnreadOut(count, False)
            scanned += 1
            if scanned > SCAN_CAP:  # mostly own or erased items: a badge poll stays cheap
                return UnreadOut(min(count, UNREAD_CAP), True)
            if item.author_id == user_id or item.author_id in erased:
                continue
            count += 1
            if count > UNREAD_CAP:
                return UnreadOut(UNREAD_CAP, True)
        if page.next_cursor is None:
            return UnreadOut(count, False)
        cursor = timeline.decode_cursor(page.next_cursor)
        limit = MAX_PAGE
