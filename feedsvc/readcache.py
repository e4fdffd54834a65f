"""Per-process read caches for ``GET /v1/inbox`` (``feedsvc/timeline.py``), and the notices
that keep them fresh across processes.

- **Celebrity heads.** Each pull author's newest ``HEAD_EVENTS`` events, shared by every
  reader of this process. A head is filled on first use by one query, whatever the number
  of readers waiting for it (request coalescing); it is dropped when the author posts (a
  notice from intake, delivered to every API process), and in any case after
  ``FEEDSVC_HEAD_TTL`` (the fallback when a notice is missed). A page deeper than the head
  reads the author's partition as before.
- **Following lists.** A reader's followed authors, checked on every read against a
  version that follow, unfollow and bulk follows replace *before* they answer: a read
  that starts after the answer, on any process, sees the new version and reloads, so an
  unfollowed author is hidden from the very next read. ``FEEDSVC_FOLLOWING_TTL`` bounds
  how long an entry lives at all.
- **The pull set's version.** Replaced when an author changes mode, so that a read after
  a follow that promoted its author pulls that author at once.

The ``Notices`` port carries versions and notices: ``LocalNotices`` (here) serves the
embedded backend's single process, ``RedisNotices`` (``feedsvc/queue/notices_redis.py``)
every API process on Redis. Both caches count hits and misses (``statistics()``).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import msgspec

from feedsvc.model import InboxItem

HEAD_EVENTS = 64  # a first page of the default 50 and a little more
MAX_HEADS = 4_096  # heads kept per process (least recently used dropped first)
MAX_FOLLOWING = 100_000  # readers' following lists kept per process

Clock = Callable[[], float]
Following = frozenset[str] | None  # None: too many to hold; the read checks with queries


class ReadStatistics(msgspec.Struct, frozen=True):
    """What this process's read caches did since it started (plain counters)."""

    head_hits: int
    head_misses: int  # reads that found no usable head
    head_fills: int  # queries that filled a head (a miss joining a fill in flight is not one)
    head_drops: int  # heads dropped by a notice
    following_hits: int
    following_misses: int  # reads that loaded the following list (absent, stale, expired)
    following_bypassed: int  # reads without the versions (Redis unavailable): no cache
    notices: int  # authors' posts noticed (this process's and the others')
    heads: int  # heads held now
    following_lists: int  # following lists held now


class NoticeSink(Protocol):
    """Where a process's notices land (``ReadCache``)."""

    def author_posted(self, author_id: str) -> None: ...

    def reset(self) -> None:
        """Notices may have been missed: forget every head."""


class Notices(Protocol):
    """Versions and notices shared by the processes that serve reads."""

    def subscribe(self, sink: NoticeSink) -> None:
        """Deliver notices (this process's and, once ``listen`` runs, the others') to
        ``sink``."""

    async def listen(self) -> None:
        """Deliver other processes' notices until cancelled (returns at once where there
        are no other processes)."""

    async def versions(self, user_id: str) -> tuple[str | None, str | None]:
        """(the version of ``user_id``'s following list, the version of the pull set)."""

    async def following_changed(self, user_ids: Sequence[str]) -> None:
        """These users' following lists changed: replace their versions (before the
        change is answered)."""

    async def pull_set_changed(self) -> None:
        """An author changed mode: replace the pull set's version."""

    async def author_posted(self, author_id: str) -> None:
        """A pull author's partition has a new event: every process drops its head."""


class Head(msgspec.Struct, frozen=True):
    items: tuple[InboxItem, ...]  # newest first
    complete: bool  # every event the author had when it was read (fewer than asked for)
    expires: float


class _Fill:
    """A head being read, shared by every reader that asks meanwhile."""

    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[Head]) -> None:
        self.future = future


class ReadCache:
    """Heads and following lists of one process; see the module docstring. ``clock`` is
    injectable (monotonic seconds)."""

    def __init__(self, clock: Clock = time.monotonic, *, max_heads: int = MAX_HEADS,
                 max_following: int = MAX_FOLLOWING) -> None:
        self._clock = clock
        self._max_heads, self._max_following = max_heads, max_following
        self._heads: OrderedDict[str, Head] = OrderedDict()
        self._fills: dict[str, _Fill] = {}
        self._tasks: set[asyncio.Future[None]] = set()
        self._following: OrderedDict[str, tuple[str | None, Following, float]] = OrderedDict()
        self._counts = dict.fromkeys(
            ("head_hits", "head_misses", "head_fills", "head_drops", "following_hits",
             "following_misses", "following_bypassed", "notices"), 0)

    # --- heads ---------------------------------------------------------------------------

    def cached_head(self, author_id: str) -> Head | None:
        """The author's head if this process holds a fresh one (counted as a hit)."""
        head = self._heads.get(author_id)
        if head is None or head.expires <= self._clock():
            return None
        self._counts["head_hits"] += 1
        self._heads.move_to_end(author_id)
        return head

    async def head(self, author_id: str, load: Callable[[int], Awaitable[list[InboxItem]]],
                   ttl: float) -> Head:
        """The author's head: cached, or read by ``load(HEAD_EVENTS)`` once for every reader
        that asks while it is read."""
        head = self.cached_head(author_id)
        if head is not None:
            return head
        self._counts["head_misses"] += 1
        fill = self._fills.get(author_id)
        if fill is None:
            self._counts["head_fills"] += 1
            fill = _Fill(asyncio.get_running_loop().create_future())
            self._fills[author_id] = fill
            task = asyncio.ensure_future(self._fill(author_id, fill, load, ttl))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(fill.future)

    async def _fill(self, author_id: str, fill: _Fill,
                    load: Callable[[int], Awaitable[list[InboxItem]]], ttl: float) -> None:
        """Read the head; every waiter gets its result or its error (a failed read is not
        kept: the next reader tries again)."""
        try:
            items = await load(HEAD_EVENTS)
        except BaseException as exc:
            if self._fills.get(author_id) is fill:
                del self._fills[author_id]
            if isinstance(exc, Exception):
                fill.future.set_exception(exc)
                fill.future.exception()  # retrieved here: the waiters may all have gone
                return
            fill.future.cancel()
            raise
        head = Head(tuple(items), len(items) < HEAD_EVENTS, self._clock() + ttl)
        if self._fills.get(author_id) is fill:  # not dropped by a notice meanwhile
            del self._fills[author_id]
            self._heads[author_id] = head
            self._heads.move_to_end(author_id)
            while len(self._heads) > self._max_heads:
                self._heads.popitem(last=False)
        fill.future.set_result(head)

    def author_posted(self, author_id: str) -> None:
        """Drop the author's head, and let a read in flight finish for its waiters without
        keeping it (it may have started before the new event was written)."""
        self._counts["notices"] += 1
        dropped = self._heads.pop(author_id, None) is not None
        dropped |= self._fills.pop(author_id, None) is not None
        self._counts["head_drops"] += dropped

    def reset(self) -> None:
        self._heads.clear()
        self._fills.clear()

    # --- following lists -----------------------------------------------------------------

    def following(self, user_id: str, version: str | None) -> Following | bool:
        """The cached following list of ``user_id`` if it is of ``version`` and not
        expired; False when it has to be loaded."""
        entry = self._following.get(user_id)
        if entry is None or entry[0] != version or entry[2] <= self._clock():
            self._counts["following_misses"] += 1
            return False
        self._counts["following_hits"] += 1
        self._following.move_to_end(user_id)
        return entry[1]

    def keep_following(self, user_id: str, version: str | None, following: Following,
                       ttl: float) -> None:
        """Keep a list loaded *after* ``version`` was read (so a change after the load has
        a newer version)."""
        self._following[user_id] = (version, following, self._clock() + ttl)
        self._following.move_to_end(user_id)
        while len(self._following) > self._max_following:
            self._following.popitem(last=False)

    def bypassed(self) -> None:
        self._counts["following_bypassed"] += 1

    def statistics(self) -> ReadStatistics:
        return ReadStatistics(**self._counts, heads=len(self._heads),
                              following_lists=len(self._following))


class LocalNotices:
    """``Notices`` within one process (the embedded backend): versions in memory, notices
    handed straight to the sink."""

    def __init__(self) -> None:
        self._sinks: list[NoticeSink] = []
        self._versions: dict[str, str] = {}
        self._pull_set: str | None = None
        self._next = itertools.count(1)

    def subscribe(self, sink: NoticeSink) -> None:
        self._sinks.append(sink)

    async def listen(self) -> None:
        return None

    async def versions(self, user_id: str) -> tuple[str | None, str | None]:
        return self._versions.get(user_id), self._pull_set

    async def following_changed(self, user_ids: Sequence[str]) -> None:
        for user_id in user_ids:
            self._versions[user_id] = str(next(self._next))

    async def pull_set_changed(self) -> None:
        self._pull_set = str(next(self._next))

    async def author_posted(self, author_id: str) -> None:
        for sink in self._sinks:
            sink.author_posted(author_id)
