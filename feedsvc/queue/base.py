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


class DeadLetter(msgspec.Struct, frozen=True):
    entry_id: str
    priority: Priority
    reason: str
    detail: str
    failed_at: int
    envelope: Envelope


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

    async def dead_letters(self, limit: int) -> list[DeadLetter]: ...

    async def stats(self) -> QueueStats: ...
