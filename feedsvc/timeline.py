"""Read merge: one user's inbox page plus pulls of the celebrities they follow.

``read_inbox`` reads the first inbox batch at once and, meanwhile, works out whom to pull:
the set of pull authors and the reader's following list come from this process's caches
(``feedsvc/readcache.py``) while their versions in ``Notices`` hold (one Redis round trip),
else from the store (one following-list query when the reader follows at most 1,000
authors; longer lists are checked with IN queries). Each followed celebrity (at most
``FEEDSVC_MAX_PULL_AUTHORS``, the most recently active first) is read from this process's
head of that author, and from the author's partition only past the head. A push reader's
page is therefore one inbox query plus cached work. Further queries run only when
filtering leaves a page short.

What a page shows is decided by ``PageBuilder``, synchronous and free of I/O.

Order is (created_at desc, event_id desc). Each item is emitted at most once: the same
event from the inbox and from a pull is one item; items sharing a non-null ``object_id``
collapse into the newest. Keyset cursors: the next page holds only items strictly older
than the last one returned, and the cursor carries hashes of the object ids already shown
(the newest ``MAX_CURSOR_OBJECTS``) so a collapsed object does not reappear later.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import heapq
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from feedsvc.errors import InvalidRequest, RetryableError
from feedsvc.model import InboxItem, Position
from feedsvc.readcache import Head
from feedsvc.runtime import Runtime

Via = Literal["push", "pull"]
MAX_CURSOR_OBJECTS = 100
FOLLOWING_SET_MAX = 1_000  # readers following more are checked with IN queries instead


class Cursor(msgspec.Struct, array_like=True, frozen=True):
    created_at: int
    event_id: str
    objects: tuple[int, ...] = ()

    @property
    def position(self) -> Position:
        return Position(self.created_at, self.event_id)


_cursor_decoder = msgspec.msgpack.Decoder(Cursor)


def encode_cursor(cursor: Cursor) -> str:
    return base64.urlsafe_b64encode(msgspec.msgpack.encode(cursor)).decode().rstrip("=")


def decode_cursor(text: str) -> Cursor:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        cursor = _cursor_decoder.decode(raw)
    except (binascii.Error, ValueError, msgspec.DecodeError) as exc:
        raise InvalidRequest("cursor is not one this API returned", code="invalid_cursor",
                             field="cursor") from exc
    if not (0 <= cursor.created_at < 2**53 and len(cursor.event_id) <= 128
            and len(cursor.objects) <= MAX_CURSOR_OBJECTS
            and all(0 <= h < 2**64 for h in cursor.objects)):
        raise InvalidRequest("cursor is not one this API returned", code="invalid_cursor",
                             field="cursor")
    return cursor


def object_hash(object_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(object_id.encode(), digest_size=8).digest(), "big")


# A fetch returns a batch of items and where the next batch starts (None: exhausted).
Fetch = Callable[[Position | None, int], Awaitable[tuple[list[InboxItem], Position | None]]]


def _continuation(rows: list[InboxItem], n: int) -> Position | None:
    return Position(rows[-1].created_at, rows[-1].event_id) if len(rows) == n else None


async def _paged(fetch: Fetch, start: Position | None, batch: int) -> AsyncIterator[InboxItem]:
    """Yield a source's items newest first, fetching ``batch`` at a time on demand."""
    position: Position | None = start
    while True:
        items, position = await fetch(position, batch)
        for item in items:
            yield item
        if position is None:
            return


class _Entry:
    """Heap entry ordered newest first."""

    __slots__ = ("item", "source", "via")

    def __init__(self, item: InboxItem, source: int, via: Via) -> None:
        self.item, self.source, self.via = item, source, via

    def __lt__(self, other: _Entry) -> bool:
        a, b = self.item, other.item
        return (a.created_at, a.event_id, other.source) > (b.created_at, b.event_id, self.source)


async def merge(sources: list[tuple[AsyncIterator[InboxItem], Via]], *,
                concurrent: bool = True) -> AsyncIterator[tuple[InboxItem, Via]]:
    """K-way merge of newest-first sources. The first fetches run concurrently, or, when
    the caller knows they are in memory (``concurrent=False``), one after the other without
    a task each."""
    if concurrent:
        firsts = await asyncio.gather(*(anext(it, None) for it, _ in sources))
    else:
        firsts = [await anext(it, None) for it, _ in sources]
    heap = [_Entry(item, i, sources[i][1]) for i, item in enumerate(firsts) if item is not None]
    heapq.heapify(heap)
    while heap:
        top = heap[0]
        yield top.item, top.via
        following = await anext(sources[top.source][0], None)
        if following is None:
            heapq.heappop(heap)
        else:
            heapq.heapreplace(heap, _Entry(following, top.source, top.via))


@dataclass
class Page:
    items: list[tuple[InboxItem, Via]] = field(default_factory=list)
    next_cursor: str | None = None


class PageBuilder:
    """The read merge's decisions, without I/O: fed the merged items newest first, it keeps
    what the page shows and says when the page is complete.

    Drops an item seen just before (the same event from the inbox and from a pull arrive
    next to each other: same position), an item older than the retention (``since_ms``) and
    an item whose object was already shown (on this page or, by the cursor's hashes, on an
    earlier one). Once ``limit`` items are kept, the next acceptable item ends the page with
    a cursor after the last kept one."""

    __slots__ = ("_last_event", "_limit", "_seen", "_seen_order", "_since", "page")

    def __init__(self, limit: int, since_ms: int, cursor: Cursor | None = None) -> None:
        self._limit, self._since = limit, since_ms
        self._seen_order: list[int] = list(cursor.objects) if cursor else []
        self._seen = set(self._seen_order)
        self._last_event: str | None = None
        self.page = Page()

    @property
    def done(self) -> bool:
        return self.page.next_cursor is not None

    def offer(self, item: InboxItem, via: Via) -> bool:
        """Consider the next item (no newer than the previous one); False once the page is
        complete and nothing more is wanted."""
        if self.done:
            return False
        if item.event_id == self._last_event or item.created_at < self._since:
            return True
        self._last_event = item.event_id
        h = object_hash(item.object_id) if item.object_id is not None else None
        if h is not None and h in self._seen:
            return True
        items = self.page.items
        if len(items) == self._limit:
            # There is at least one more item: the page ends here with a cursor.
            tail = items[-1][0]
            self.page.next_cursor = encode_cursor(Cursor(
                tail.created_at, tail.event_id, tuple(self._seen_order[-MAX_CURSOR_OBJECTS:])))
            return False
        if h is not None:
            self._seen.add(h)
            self._seen_order.append(h)
        items.append((item, via))
        return True


def build_page(items: Iterable[tuple[InboxItem, Via]], limit: int, since_ms: int,
               cursor: Cursor | None = None) -> Page:
    """``PageBuilder`` over an in-memory, already merged sequence."""
    builder = PageBuilder(limit, since_ms, cursor)
    for item, via in items:
        if not builder.offer(item, via):
            break
    return builder.page


async def read_inbox(rt: Runtime, user_id: str, limit: int, cursor: Cursor | None) -> Page:
    start = cursor.position if cursor else None
    # The inbox's first batch needs nothing else: read it while the rest is worked out.
    first_rows = asyncio.ensure_future(rt.store.read_inbox(user_id, start, limit + 1))
    try:
        return await _merged_page(rt, user_id, limit, cursor, first_rows)
    finally:
        if not first_rows.done():
            first_rows.cancel()
        await asyncio.gather(first_rows, return_exceptions=True)


async def _merged_page(rt: Runtime, user_id: str, limit: int, cursor: Cursor | None,
                       first_rows: Awaitable[list[InboxItem]]) -> Page:
    store = rt.store
    since = rt.now_ms() - rt.settings.retention_ms
    start = cursor.position if cursor else None
    batch = limit + 1
    pulls, known = await _pulls_and_following(rt, user_id)

    async def followed(authors: list[str]) -> set[str]:
        if known is not None:
            return {a for a in authors if a in known}
        return await store.following_subset(user_id, authors) if authors else set()

    candidates = [a for a in pulls if a != user_id]
    celebrities = sorted(await followed(candidates), key=lambda a: (pulls[a], a),
                         reverse=True)[: rt.settings.max_pull_authors]

    async def inbox_batch(
        position: Position | None, n: int
    ) -> tuple[list[InboxItem], Position | None]:
        rows = await (first_rows if position == start else store.read_inbox(user_id,
                                                                            position, n))
        # Unfollowed authors leave the inbox at once: filter here, the unmerge job deletes.
        authors = {r.author_id for r in rows if not r.direct and r.author_id != user_id}
        kept = await followed(list(authors))
        visible = [r for r in rows if r.direct or r.author_id == user_id or r.author_id in kept]
        return visible, _continuation(rows, n)

    sources: list[tuple[AsyncIterator[InboxItem], Via]] = [
        (_paged(inbox_batch, start, batch), "push")
    ]
    heads = await _heads(rt, celebrities, since) if rt.settings.head_ttl > 0 else {}
    sources += [(_celebrity(rt, a, heads.get(a), start, batch, since), "pull")
                for a in celebrities]

    builder = PageBuilder(limit, since, cursor)
    # With every celebrity's first item in a head, only the inbox's first batch is I/O (in
    # flight already): no task per source.
    in_heads = len(heads) == len(celebrities) and all(
        _first_in_head(h, start) for h in heads.values())
    stream: Any = merge(sources, concurrent=not in_heads)
    try:
        async for item, via in stream:
            if not builder.offer(item, via):
                break
    finally:
        await stream.aclose()
        for source, _ in sources:
            await source.aclose()  # type: ignore[attr-defined]
    return builder.page


async def _pulls_and_following(rt: Runtime, user_id: str
                               ) -> tuple[dict[str, int], frozenset[str] | None]:
    """The pull set and who the reader follows (None: more than ``FOLLOWING_SET_MAX``, checked
    with queries instead). Both come from this process's caches while their versions hold;
    without the versions (Redis unavailable) both are read from the store."""
    settings, store = rt.settings, rt.store
    try:
        following_version, pull_version = await rt.notices.versions(user_id)
    except RetryableError:
        rt.reads.bypassed()
        pulls, (following, more) = await asyncio.gather(
            store.pull_authors(), store.following_page(user_id, None, FOLLOWING_SET_MAX))
        return pulls, frozenset(following) if more is None else None
    cached = (rt.reads.following(user_id, following_version)
              if settings.following_ttl > 0 else False)
    if cached is not False:
        assert not isinstance(cached, bool)
        return await rt.pull_set.get(store, settings.pull_set_ttl, pull_version), cached
    # One query answers both "which celebrities to pull" and "which inbox authors are
    # unfollowed" when the list is short (most readers).
    pulls, (following, more) = await asyncio.gather(
        rt.pull_set.get(store, settings.pull_set_ttl, pull_version),
        store.following_page(user_id, None, FOLLOWING_SET_MAX))
    known = frozenset(following) if more is None else None
    if settings.following_ttl > 0:
        rt.reads.keep_following(user_id, following_version, known, settings.following_ttl)
    return pulls, known


async def _heads(rt: Runtime, authors: list[str], since: int) -> dict[str, Head]:
    """This process's heads of ``authors``; the ones it lacks are read concurrently."""
    reads, store = rt.reads, rt.store
    heads: dict[str, Head] = {}
    missing = []
    for author_id in authors:
        head = reads.cached_head(author_id)
        if head is None:
            missing.append(author_id)
        else:
            heads[author_id] = head

    def loader(author_id: str) -> Callable[[int], Awaitable[list[InboxItem]]]:
        return lambda n: store.author_events(author_id, None, n, since)

    if missing:
        filled = await asyncio.gather(*(reads.head(a, loader(a), rt.settings.head_ttl)
                                        for a in missing))
        heads.update(zip(missing, filled, strict=True))
    return heads


def _older(item: InboxItem, start: Position | None) -> bool:
    return start is None or (item.created_at, item.event_id) < (start.created_at,
                                                                 start.event_id)


def _first_in_head(head: Head, start: Position | None) -> bool:
    """Whether the head alone answers the source's first item (or that it has none)."""
    return head.complete or bool(head.items and _older(head.items[-1], start))


async def _celebrity(rt: Runtime, author_id: str, head: Head | None, start: Position | None,
                     batch: int, since: int) -> AsyncIterator[InboxItem]:
    """A pull author's events older than ``start``, newest first: from this process's head
    of the author as far as it goes, then from the author's partition."""
    store = rt.store

    async def fetch(position: Position | None, n: int
                    ) -> tuple[list[InboxItem], Position | None]:
        rows = await store.author_events(author_id, position, n, since)
        return rows, _continuation(rows, n)

    position = start
    if head is not None and _first_in_head(head, start):
        items = head.items
        skip = 0
        while skip < len(items) and not _older(items[skip], start):
            skip += 1
        for item in items[skip:]:
            yield item
        if head.complete:
            return
        position = Position(items[-1].created_at, items[-1].event_id)
    async for item in _paged(fetch, position, batch):
        yield item
