"""The composition root for stores and queues: ``open_runtime(settings)``.

Nothing connects at import time. The API, the workers and the CLI all get a ``Runtime``
(settings + store + queue) from here, built for the configured backend: Cassandra + Redis
when ``FEEDSVC_CASSANDRA_HOSTS`` is set, else the embedded SQLite store and queue.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from feedsvc.clock import now_ms
from feedsvc.config import Settings
from feedsvc.delivery.breaker import BreakerConfig, Breakers
from feedsvc.delivery.recipients import Recipients
from feedsvc.delivery.state import DeliveryState
from feedsvc.errors import Unprocessable
from feedsvc.queue.base import Queue
from feedsvc.readcache import LocalNotices, Notices, ReadCache
from feedsvc.store.base import BackendStore, Outbox, Store
from feedsvc.store.policy import PolicyState


class PullSetCache:
    """The set of pull authors, reused for ``ttl`` seconds by this process's reads while
    its ``version`` (``Notices.versions``: replaced when an author changes mode) holds."""

    def __init__(self) -> None:
        self.value: dict[str, int] = {}
        self.expires = 0.0
        self.version: str | None = None

    async def get(self, store: Store, ttl: float, version: str | None = None) -> dict[str, int]:
        now = time.monotonic()
        if ttl <= 0 or now >= self.expires or version != self.version:
            self.value = await store.pull_authors()
            self.expires = now + ttl
            self.version = version
        return self.value


class ErasedCache:
    """The erased users (``feedsvc/erasure.py``), reused for ``ERASED_TTL_S`` by this
    process; an erasure made here is seen here at once, elsewhere within that time."""

    ERASED_TTL_S = 1.0

    def __init__(self) -> None:
        self.value: dict[str, int] = {}
        self.expires = 0.0
        # Erasures made by this process, merged into every read: a refresh whose query
        # started before the tombstone was written must not drop one.
        self.local: dict[str, int] = {}

    async def get(self, rt: Runtime) -> dict[str, int]:
        now = time.monotonic()
        if now >= self.expires:
            self.expires = now + self.ERASED_TTL_S
            self.value = {**await rt.policy.erasures.erased(), **self.local}
        return self.value

    def add(self, user_id: str, erased_at: int) -> None:
        self.local[user_id] = erased_at
        self.value = {**self.value, user_id: erased_at}

    async def refuse(self, rt: Runtime, *user_ids: str) -> None:
        """422 ``user_erased`` naming the first erased user among ``user_ids``."""
        erased = await self.get(rt)
        for user_id in user_ids:
            if user_id in erased:
                raise Unprocessable(f"user {user_id!r} was erased", code="user_erased",
                                    field="user_id")


class WorkerHealth:
    """What this process's consumers last reported, for ``/readyz`` and ``feedsvc serve``:
    each consumer beats once per loop (a claim waits at most a second or two, a retry
    pause at most ``workers.BACKOFF_CAP``); ``failed`` says why the worker task ended."""

    def __init__(self) -> None:
        self.expected = 0  # consumers this process runs (0: none, an API-only process)
        self.beats: dict[str, float] = {}
        self.failed: str | None = None
        self.ended = asyncio.Event()  # set with ``failed``

    def fail(self, reason: str) -> None:
        self.failed = reason
        self.ended.set()

    def beat(self, consumer: str) -> None:
        self.beats[consumer] = time.monotonic()

    def problem(self, silent_after: float = 60.0) -> str | None:
        """Why the in-process workers are not healthy, or None."""
        if self.failed is not None:
            return self.failed
        now = time.monotonic()
        alive = sum(1 for t in self.beats.values() if now - t < silent_after)
        if alive < self.expected:
            return f"{self.expected - alive} of {self.expected} workers silent"
        return None


@dataclass(frozen=True)
class Runtime:
    settings: Settings
    store: BackendStore  # the feed's data and, beside it, the outbox
    queue: Queue
    recipients: Recipients  # delivery: devices, contacts, preferences
    delivery: DeliveryState  # delivery: templates, the delivery log, send-once claims
    # provider message ids, seen webhooks, inbox read marks, erasure (feedsvc/store/policy.py)
    policy: PolicyState
    pull_set: PullSetCache = field(default_factory=PullSetCache)
    erased: ErasedCache = field(default_factory=ErasedCache)
    health: WorkerHealth = field(default_factory=lambda: WorkerHealth())
    # Read caches of this process and the notices that keep them fresh (feedsvc/readcache.py).
    notices: Notices = field(default_factory=LocalNotices)
    reads: ReadCache = field(default_factory=ReadCache)
    # Epoch ms. Tests pass a fake clock (``tests/clock.py``); every timestamp the runtime
    # writes and every policy decision (quiet hours, rate windows, breakers) reads it.
    clock: Callable[[], int] = now_ms
    breakers: Breakers = field(default_factory=Breakers)  # this process's, per provider

    def __post_init__(self) -> None:
        self.notices.subscribe(self.reads)
        s = self.settings
        self.breakers.config = BreakerConfig(s.breaker_failures, s.breaker_ratio,
                                             s.breaker_window, s.breaker_cooldown)

    @property
    def outbox(self) -> Outbox:
        return self.store

    def now_ms(self) -> int:
        return self.clock()

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


async def open_store(settings: Settings) -> BackendStore:
    if settings.embedded:
        from feedsvc.store.sqlite import SqliteStore

        return await SqliteStore.open(settings.data_dir / "feedsvc.sqlite3")
    from feedsvc.store.cassandra import CassandraStore

    return await CassandraStore.open(
        settings.cassandra_hosts, settings.keyspace, settings.fanout_concurrency,
        request_timeout=settings.request_timeout, consistency=settings.consistency,
        serial_consistency=settings.serial_consistency,
    )


async def open_delivery(store: BackendStore, queue: Queue) -> DeliveryState:
    """Templates and the delivery log beside ``store``, send-once claims and the policy
    state beside ``queue``."""
    from feedsvc.queue.redis import RedisQueue
    from feedsvc.store.cassandra import CassandraStore

    templates_and_log: Any
    once: Any
    policy: Any
    if isinstance(store, CassandraStore):
        from feedsvc.store.delivery_cassandra import CassandraDeliveryStore

        templates_and_log = await CassandraDeliveryStore.open(store)
    else:
        from feedsvc.store.delivery_sqlite import SqliteDeliveryStore
        from feedsvc.store.sqlite import SqliteStore

        assert isinstance(store, SqliteStore)
        templates_and_log = await SqliteDeliveryStore.open(store)
    if isinstance(queue, RedisQueue):
        from feedsvc.queue.policy_redis import RedisPolicyState
        from feedsvc.queue.sendonce_redis import RedisSendOnce

        once = RedisSendOnce(queue)
        policy = RedisPolicyState(queue)
    else:
        from feedsvc.queue.embedded import EmbeddedQueue
        from feedsvc.queue.sendonce_sqlite import SqliteSendOnce

        assert isinstance(queue, EmbeddedQueue)
        from feedsvc.queue.policy_sqlite import SqlitePolicyState

        once = await SqliteSendOnce.open(queue)
        policy = await SqlitePolicyState.open(queue)
    return DeliveryState(templates_and_log, templates_and_log, once, policy)


async def open_recipients(store: BackendStore) -> Recipients:
    """The delivery recipients, on the same file or session as ``store``."""
    from feedsvc.store.cassandra import CassandraStore

    if isinstance(store, CassandraStore):
        from feedsvc.store.recipients_cassandra import CassandraRecipients

        return await CassandraRecipients.open(store)
    from feedsvc.store.recipients_sqlite import SqliteRecipients
    from feedsvc.store.sqlite import SqliteStore

    assert isinstance(store, SqliteStore)
    return await SqliteRecipients.open(store)


async def open_policy(store: BackendStore) -> PolicyState:
    """Provider ids, seen webhooks, read marks and erasures, on the same file or session
    as ``store`` (after ``open_delivery``: the embedded file indexes the delivery log)."""
    from feedsvc.store.cassandra import CassandraStore

    ports: Any
    if isinstance(store, CassandraStore):
        from feedsvc.store.policy_cassandra import CassandraPolicyStore

        ports = await CassandraPolicyStore.open(store)
    else:
        from feedsvc.store.policy_sqlite import SqlitePolicyStore
        from feedsvc.store.sqlite import SqliteStore

        assert isinstance(store, SqliteStore)
        ports = await SqlitePolicyStore.open(store)
    return PolicyState(ports, ports, ports, ports)


def open_notices(queue: Queue) -> Notices:
    """Read-cache notices beside ``queue``: in Redis for every process, else in-process."""
    from feedsvc.queue.redis import RedisQueue

    if isinstance(queue, RedisQueue):
        from feedsvc.queue.notices_redis import RedisNotices

        return RedisNotices(queue)
    return LocalNotices()


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
        request_timeout=settings.request_timeout, shards=settings.queue_shards,
        cluster=settings.redis_cluster,
        claim_idle=settings.claim_idle, low_max_age=settings.low_max_age,
    )


@asynccontextmanager
async def open_runtime(settings: Settings) -> AsyncIterator[Runtime]:
    settings.check_backend()
    store = await open_store(settings)
    try:
        recipients = await open_recipients(store)
        queue = await open_queue(settings)
        try:
            delivery = await open_delivery(store, queue)
            yield Runtime(settings, store, queue, recipients=recipients,
                          delivery=delivery, policy=await open_policy(store),
                          notices=open_notices(queue))
        finally:
            await queue.close()
    finally:
        await store.close()
