"""The composition root for stores and queues: ``open_runtime(settings)``.

Nothing connects at import time. The API, the workers and the CLI all get a ``Runtime``
(settings + store + queue) from here, built for the configured backend: Cassandra + Redis
when ``FEEDSVC_CASSANDRA_HOSTS`` is set, else the embedded SQLite store and queue.
"""

from __future__ import annotations

import gc
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from feedsvc.clock import now_ms
from feedsvc.config import Settings
from feedsvc.queue.base import Queue
from feedsvc.store.base import Store


class PullSetCache:
    """The set of pull authors, reused for ``ttl`` seconds by this process's reads."""

    def __init__(self) -> None:
        self.value: dict[str, int] = {}
        self.expires = 0.0

    async def get(self, store: Store, ttl: float) -> dict[str, int]:
        now = time.monotonic()
        if ttl <= 0 or now >= self.expires:
            self.value = await store.pull_authors()
            self.expires = now + ttl
        return self.value


@dataclass(frozen=True)
class Runtime:
    settings: Settings
    store: Store
    queue: Queue
    pull_set: PullSetCache = field(default_factory=PullSetCache)

    def now_ms(self) -> int:
        return now_ms()

    def ttl_left_s(self, created_at_ms: int, now_ms: int | None = None) -> int:
        """Seconds of retention an item created at ``created_at_ms`` has left (at ``now_ms``,
        by default now)."""
        now = self.now_ms() if now_ms is None else now_ms
        return (created_at_ms + self.settings.retention_ms - now) // 1000


def freeze_startup_heap() -> None:
    """For a long-running process once it is up (modules imported, connections open, cluster
    metadata loaded): move every object alive now out of the cyclic garbage collector's way.
    They live as long as the process, and each full collection would walk all of them again
    (in a fan-out write loop that halved the time full collections took)."""
    gc.collect()
    gc.freeze()


async def open_store(settings: Settings) -> Store:
    if settings.embedded:
        from feedsvc.store.sqlite import SqliteStore

        return await SqliteStore.open(settings.data_dir / "feedsvc.sqlite3")
    from feedsvc.store.cassandra import CassandraStore

    return await CassandraStore.open(
        settings.cassandra_hosts, settings.keyspace, settings.fanout_concurrency
    )


async def open_queue(settings: Settings) -> Queue:
    if settings.embedded:
        from feedsvc.queue.embedded import EmbeddedQueue

        return await EmbeddedQueue.open(
            settings.data_dir / "queue.sqlite3",
            claim_idle=settings.claim_idle, low_max_age=settings.low_max_age,
        )
    from feedsvc.queue.redis import RedisQueue

    assert settings.redis_url is not None
    return await RedisQueue.open(
        settings.redis_url, prefix=settings.queue_prefix,
        claim_idle=settings.claim_idle, low_max_age=settings.low_max_age,
    )


@asynccontextmanager
async def open_runtime(settings: Settings) -> AsyncIterator[Runtime]:
    settings.check_backend()
    store = await open_store(settings)
    try:
        queue = await open_queue(settings)
        try:
            yield Runtime(settings, store, queue)
        finally:
            await queue.close()
    finally:
        await store.close()
