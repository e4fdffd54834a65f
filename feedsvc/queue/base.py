"""The queue port: priority streams with consumer groups, at-least-once.

An entry stays pending until ``ack``; an entry whose consumer died is handed to another
consumer once it has been idle for ``claim_idle`` seconds. ``claim`` returns high before
medium before low. Low entries older than ``low_max_age`` are not returned: they are shed
(counted, and written to the dead-letter stream with reason ``shed``).

Two implementations pass one contract suite: ``RedisQueue`` (Redis Streams) and
``EmbeddedQueue`` (SQLite, for the embedded single-process mode).
"""

from __future__ import annotations

from typing import Protocol

import msgspec

from feedsvc.model import Envelope, Priority


class Delivery(msgspec.Struct, frozen=True):
    priority: Priority
    entry_id: str
    envelope: Envelope
    shard: int = 0  # which of the priority's streams holds it (Redis, FEEDSVC_QUEUE_SHARDS)


class DeadLetter(msgspec.Struct, frozen=True):
    entry_id: str  # the queue entry that failed
    priority: Priority
    reason: str
    detail: str
    failed_at: int
    envelope: Envelope
    dlq_id: str = ""  # its id in the dead-letter stream (filled in when read)


class QueueStats(msgspec.Struct, frozen=True):
    depth: dict[str, int]  # entries not yet acknowledged, per priority
    dead_letters: int
    shed: int


class Queue(Protocol):
    async def ping(self) -> None: ...

    async def close(self) -> None: ...

    async def enqueue(self, priority: Priority, envelope: Envelope) -> str: ...

    async def claim(self, consumer: str, block_s: float) -> Delivery | None:
        """The next entry for ``consumer`` (highest priority first), waiting up to
        ``block_s`` seconds; None when there is nothing to do."""

    async def ack(self, delivery: Delivery) -> None: ...

    async def dead_letter(self, delivery: Delivery, reason: str, detail: str) -> None:
        """Record the entry in the dead-letter stream and acknowledge it."""

    async def dead_letters(self, limit: int, before: str | None = None) -> list[DeadLetter]:
        """The newest dead letters first, older than ``before`` (a ``dlq_id``) if given."""

    async def dead_letter_get(self, dlq_id: str) -> DeadLetter | None: ...

    async def replay(self, dlq_id: str) -> bool:
        """Put the dead letter's task back on its priority stream (as a new entry) and
        remove it from the dead letters, atomically; False when there is no such entry."""

    async def stats(self) -> QueueStats: ...

    # --- for the outbox sweeper -----------------------------------------------------------

    async def oldest_queued_ms(self, priority: Priority) -> int | None:
        """When the oldest entry still in ``priority``'s stream (pending or not) was queued,
        in epoch ms by the queue's clock; None when the stream is empty."""

    async def try_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take or renew the lease ``name`` for ``holder`` for ``ttl_s`` seconds; False when
        another holder has it."""

    async def prune_consumers(self, idle_s: float) -> int:
        """Forget consumers idle for ``idle_s`` that hold no pending entry; returns how
        many were removed."""
