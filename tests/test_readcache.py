"""The per-process read caches (``feedsvc/readcache.py``) without servers: one query for
concurrent readers of a head, notices drop heads (also one being read), TTLs with an
injected clock, versioned following lists, counters; and the Redis notices between two
clients of a real Redis (two processes' worth)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import redis.asyncio as aioredis

from feedsvc.model import InboxItem
from feedsvc.queue.notices_redis import RedisNotices
from feedsvc.queue.redis import RedisQueue
from feedsvc.readcache import HEAD_EVENTS, LocalNotices, ReadCache
from tests.servers import Endpoints


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def item(n: int) -> InboxItem:
    return InboxItem(event_id=f"e{n}", author_id="celeb", kind="k", created_at=n,
                     priority="medium", payload="{}")


class Loader:
    """Counts reads; each waits for ``gate`` so that readers pile up meanwhile."""

    def __init__(self, items: list[InboxItem]) -> None:
        self.items, self.calls = items, 0
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail: Exception | None = None

    async def __call__(self, n: int) -> list[InboxItem]:
        self.calls += 1
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return self.items[:n]


async def test_concurrent_readers_share_one_query() -> None:
    cache = ReadCache(Clock())
    load = Loader([item(3), item(2), item(1)])
    load.gate.clear()
    readers = [asyncio.ensure_future(cache.head("celeb", load, 5.0)) for _ in range(50)]
    await asyncio.sleep(0)
    load.gate.set()
    heads = await asyncio.gather(*readers)
    assert load.calls == 1
    assert all(h.items == (item(3), item(2), item(1)) and h.complete for h in heads)
    await cache.head("celeb", load, 5.0)
    stats = cache.statistics()
    assert (stats.head_fills, stats.head_misses, stats.head_hits) == (1, 50, 1)
    assert stats.heads == 1


async def test_a_full_head_is_not_complete() -> None:
    cache = ReadCache(Clock())
    head = await cache.head("celeb", Loader([item(n) for n in range(100, 0, -1)]), 5.0)
    assert len(head.items) == HEAD_EVENTS and not head.complete


async def test_ttl_expires_a_head() -> None:
    clock = Clock()
    cache = ReadCache(clock)
    load = Loader([item(1)])
    await cache.head("celeb", load, 5.0)
    clock.now += 4.9
    await cache.head("celeb", load, 5.0)
    assert load.calls == 1
    clock.now += 0.2
    await cache.head("celeb", load, 5.0)
    assert load.calls == 2


async def test_a_notice_drops_the_head_and_a_read_in_flight() -> None:
    cache = ReadCache(Clock())
    load = Loader([item(1)])
    await cache.head("celeb", load, 60.0)
    cache.author_posted("celeb")
    load.items = [item(2), item(1)]
    assert (await cache.head("celeb", load, 60.0)).items[0] == item(2)
    # A read that started before the notice answers its own waiters but is not kept.
    load.gate.clear()
    early = asyncio.ensure_future(cache.head("celeb", load, 60.0))
    cache.author_posted("celeb")  # nothing cached now; the read in flight is forgotten
    load.items = [item(3), item(2), item(1)]
    late = asyncio.ensure_future(cache.head("celeb", load, 60.0))
    await asyncio.sleep(0)
    load.gate.set()
    await early
    assert (await late).items[0] == item(3)
    assert (await cache.head("celeb", load, 60.0)).items[0] == item(3)
    assert cache.statistics().head_drops == 2


async def test_a_failed_read_reaches_every_waiter_and_is_not_kept() -> None:
    cache = ReadCache(Clock())
    load = Loader([item(1)])
    load.fail = RuntimeError("store down")
    load.gate.clear()
    readers = [asyncio.ensure_future(cache.head("celeb", load, 5.0)) for _ in range(3)]
    await asyncio.sleep(0)
    load.gate.set()
    results = await asyncio.gather(*readers, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    load.fail = None
    assert (await cache.head("celeb", load, 5.0)).items == (item(1),)
    assert load.calls == 2


async def test_heads_are_bounded() -> None:
    cache = ReadCache(Clock(), max_heads=3)
    for n in range(5):
        await cache.head(f"a{n}", Loader([item(n)]), 5.0)
    assert cache.statistics().heads == 3


def test_following_list_is_kept_per_version_and_ttl() -> None:
    clock = Clock()
    cache = ReadCache(clock)
    assert cache.following("u", None) is False
    cache.keep_following("u", None, frozenset({"a", "b"}), 60.0)
    assert cache.following("u", None) == frozenset({"a", "b"})
    assert cache.following("u", "v2") is False  # changed since: reload
    cache.keep_following("u", "v2", None, 60.0)  # too many to hold: None is kept as such
    assert cache.following("u", "v2") is None
    clock.now += 61
    assert cache.following("u", "v2") is False
    stats = cache.statistics()
    assert (stats.following_hits, stats.following_misses) == (2, 3)


async def test_local_notices_replace_versions_and_drop_heads() -> None:
    notices = LocalNotices()
    cache = ReadCache(Clock())
    notices.subscribe(cache)
    assert await notices.versions("u") == (None, None)
    await notices.following_changed(["u", "w"])
    first, _ = await notices.versions("u")
    await notices.following_changed(["u"])
    second, _ = await notices.versions("u")
    assert None is not first != second
    await notices.pull_set_changed()
    assert (await notices.versions("u"))[1] is not None
    load = Loader([item(1)])
    await cache.head("celeb", load, 60.0)
    await notices.author_posted("celeb")
    await cache.head("celeb", load, 60.0)
    assert load.calls == 2


@pytest.mark.timeout(60)
async def test_redis_notices_reach_another_process(endpoints: Endpoints, prefix: str,
                                                   redis_client: aioredis.Redis) -> None:
    """Two ``RedisNotices`` on separate clients stand for two API processes."""
    queues = [await RedisQueue.open(endpoints.redis_url, prefix=prefix,
                                    cluster=endpoints.redis_cluster) for _ in range(2)]
    try:
        one, two = (RedisNotices(q) for q in queues)
        caches = [ReadCache(), ReadCache()]
        one.subscribe(caches[0])
        two.subscribe(caches[1])
        listeners = [asyncio.ensure_future(n.listen()) for n in (one, two)]
        try:
            loads = [Loader([item(1)]), Loader([item(1)])]
            for cache, load in zip(caches, loads, strict=True):
                await cache.head("celeb", load, 600.0)
            await asyncio.sleep(0.3)  # both listeners are reading the stream
            await one.author_posted("celeb")
            for _ in range(200):  # until the other process has it (at most 10 s)
                if caches[1].statistics().head_drops == 1:
                    break
                await asyncio.sleep(0.05)
            assert [c.statistics().head_drops for c in caches] == [1, 1]
            assert caches[0].statistics().notices == 1  # its own notice applied once
            # Versions: what one process replaces, the other reads.
            before = await two.versions("u")
            await one.following_changed(["u"])
            await one.pull_set_changed()
            after = await two.versions("u")
            assert after[0] is not None and after[0] != before[0]
            assert after[1] is not None and after[1] != before[1]
        finally:
            for task in listeners:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    finally:
        for q in queues:
            await q.close()
