"""The queue port: priority streams with consumer groups, at-least-once.

There are four queues, each with its three priority streams: ``fanout`` (fan-out,
backfill, unmerge and notify fan-out tasks) and one per delivery channel (``push``,
``sms``, ``email``), so that a slow provider never holds up inboxes; a consumer serves the
queues it is given. A task can also be scheduled for later (a delivery's retry): it joins
its stream when due.

An entry stays pending until ``ack``; an entry whose consumer died is handed to another
consumer once it has been idle for ``claim_idle`` seconds. ``claim`` returns high before
medium before low. Low entries older than ``low_max_age`` are not returned: they are shed
(counted, and written to the dead-letter stream with reason ``shed``).

Two implementations pass one contract suite: ``RedisQueue`` (Redis Streams) and
``EmbeddedQueue`` (SQLite, for the embedded single-process mode).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

import msgspec

from feedsvc.model import Envelope, Priority

QueueName = Literal["fanout", "push", "sms", "email"]
QUEUES: tuple[QueueName, ...] = ("fanout", "push", "sms", "email")
FANOUT: tuple[QueueName, ...] = ("fanout",)


class Delivery(msgspec.Struct, frozen=True):
    priority: Priority
    entry_id: str
    envelope: Envelope
    shard: int = 0  # which of the priority's streams holds it (Redis, FEEDSVC_QUEUE_SHARDS)
    queue: QueueName = "fanout"


class DeadLetter(msgspec.Struct, frozen=True):
    entry_id: str  # the queue entry that failed
    priority: Priority
    reason: str
    detail: str
    failed_at: int
    envelope: Envelope
    dlq_id: str = ""  # its id in the dead-letter stream (filled in when read)
    queue: QueueName = "fanout"  # where a replay puts it back


class QueueStats(msgspec.Struct, frozen=True):
    depth: dict[str, int]  # fan-out entries not yet acknowledged, per priority
    dead_letters: int
    shed: int
    queued: dict[str, int] = msgspec.field(default_factory=dict)  # per queue, every priority
    scheduled: int = 0  # entries waiting for their time


class StreamStats(msgspec.Struct, frozen=True):
    """One queue's stream of one priority (all its shards): for metrics and the status."""

    queue: QueueName
    priority: Priority
    depth: int  # entries not yet acknowledged, pending ones included (not scheduled ones)
    pending: int  # handed to a consumer, not yet acknowledged
    oldest_ms: int | None  # when the oldest of them was queued (epoch ms); None: empty


class Queue(Protocol):
    async def ping(self) -> None: ...

    async def close(self) -> None: ...

    async def enqueue(self, priority: Priority, envelope: Envelope,
                      queue: QueueName = "fanout") -> str: ...

    async def enqueue_many(self, queue: QueueName, priority: Priority,
                           envelopes: Sequence[Envelope]) -> None:
        """Several entries in one round trip (not atomically: each is at-least-once)."""

    async def schedule(self, queue: QueueName, priority: Priority, envelope: Envelope,
                       due_ms: int) -> None:
        """Queue ``envelope`` once ``due_ms`` (epoch ms) has come (a waiting retry)."""

    async def claim(self, consumer: str, block_s: float,
                    queues: Sequence[QueueName] = FANOUT) -> Delivery | None:
        """The next entry of ``queues`` for ``consumer`` (highest priority first, then the
        queues in the order given), waiting up to ``block_s`` seconds; None when there is
        nothing to do."""

    async def ack(self, delivery: Delivery) -> None: ...

    async def touch(self, delivery: Delivery, consumer: str) -> None:
        """The consumer is still working on the entry: it is not idle (not reclaimed)."""

    async def dead_letter(self, delivery: Delivery, reason: str, detail: str) -> None:
        """Record the entry in the dead-letter stream and acknowledge it."""

    async def bury(self, queue: QueueName, priority: Priority, envelope: Envelope,
                   reason: str, detail: str) -> None:
        """Record a task in the dead letters without it being a queue entry (one target of
        a channel task that failed for good)."""

    async def dead_letters(self, limit: int, before: str | None = None) -> list[DeadLetter]:
        """The newest dead letters first, older than ``before`` (a ``dlq_id``) if given."""

    async def dead_letter_get(self, dlq_id: str) -> DeadLetter | None: ...

    async def replay(self, dlq_id: str) -> bool:
        """Put the dead letter's task back on its priority stream (as a new entry) and
        remove it from the dead letters, atomically; False when there is no such entry."""

    async def stats(self) -> QueueStats: ...

    async def stream_stats(self) -> list[StreamStats]:
        """Every queue's stream of every priority, each once (shards added up)."""

    # --- process reports (``feedsvc/ops.py``: who is running, and their figures) ----------

    async def put_report(self, process_id: str, body: bytes) -> None:
        """Keep ``body`` as the latest report of ``process_id``, stamped with the time now."""

    async def reports(self, within_s: float) -> list[tuple[int, bytes]]:
        """The reports stamped in the last ``within_s`` seconds, as (stamp in epoch ms,
        body); reports an hour old are forgotten."""

    async def drop_report(self, process_id: str) -> None:
        """Forget a process's report (it stopped)."""

    # --- for the outbox sweeper -----------------------------------------------------------

    async def oldest_queued_ms(self, priority: Priority,
                               queue: QueueName = "fanout") -> int | None:
        """When the oldest entry still in ``priority``'s stream (pending or not) was queued,
        in epoch ms by the queue's clock; None when the stream is empty."""

    async def try_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take or renew the lease ``name`` for ``holder`` for ``ttl_s`` seconds; False when
        another holder has it."""

    async def move_due(self, now: int | None = None) -> int:
        """Make scheduled entries whose time has come claimable; claims do this too, a few
        times a second, so calling it is only needed to hurry (tests)."""

    async def prune_consumers(self, idle_s: float) -> int:
        """Forget consumers idle for ``idle_s`` that hold no pending entry; returns how
        many were removed."""
