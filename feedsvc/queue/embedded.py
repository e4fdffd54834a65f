"""Embedded queue: the same contract as the Redis Streams queue, on a SQLite file.

For the embedded single-process mode. Entries are rows; ``claim`` marks a row with its
consumer and time, ``ack`` deletes it. Entries claimed by a consumer that has been silent
for ``claim_idle`` are claimable again, so nothing accepted is lost on a crash. Writes of
more than one statement run in one transaction (``SqliteFile.transaction``).
Waiting consumers are woken by an in-process event rather than polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from feedsvc import metrics
from feedsvc.clock import now_ms
from feedsvc.model import PRIORITIES, Envelope, Priority, decode_envelope, encode_envelope
from feedsvc.queue.base import (
    FANOUT,
    QUEUES,
    DeadLetter,
    Delivery,
    QueueName,
    QueueStats,
    StreamStats,
)
from feedsvc.sqlite_file import SqliteFile

_SCHEMA = """
PRAGMA journal_mode=WAL;
PRAGMA synchronous=NORMAL;
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT, priority INTEGER NOT NULL, body BLOB NOT NULL,
    consumer TEXT, claimed_at INTEGER, queued_at INTEGER);
CREATE INDEX IF NOT EXISTS entries_order ON entries (priority, id);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS processes (
    name TEXT PRIMARY KEY, seen_at INTEGER NOT NULL, body BLOB NOT NULL);
"""
REPORTS_KEPT_MS = 3_600_000  # a process silent this long is forgotten


@metrics.instrumented("sqlite_queue")
class EmbeddedQueue(SqliteFile):
    """``Queue`` on SQLite; see the module docstring."""

    SCHEMA = _SCHEMA

    def __init__(self, path: Path, *, claim_idle: float = 60.0,
                 low_max_age: float = 3600.0) -> None:
        super().__init__(path)
        self.claim_idle_ms = int(claim_idle * 1000)
        self.low_max_age_ms = int(low_max_age * 1000)
        self._wakeup = asyncio.Event()

    @classmethod
    async def open(cls, path: Path, **kwargs: Any) -> EmbeddedQueue:
        queue = cls(path, **kwargs)
        await queue._run(queue._open)
        return queue

    def _open(self) -> None:
        super()._open()
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(entries)")}
        for column, kind in (("queued_at", "INTEGER"), ("queue", "TEXT NOT NULL DEFAULT "
                                                        "'fanout'"), ("due_at", "INTEGER")):
            if column not in columns:  # a file made by an older version
                self.db.execute(f"ALTER TABLE entries ADD COLUMN {column} {kind}")
        self.db.execute("CREATE INDEX IF NOT EXISTS entries_by_queue ON entries "
                        "(queue, priority, id)")
        # Claims left by a process that died are claimable once idle for claim_idle, like
        # any other: releasing them here would also release a running process's (the CLI
        # opens the file beside `feedsvc serve`).

    async def enqueue(self, priority: Priority, envelope: Envelope,
                      queue: QueueName = "fanout") -> str:
        cur = await self._run(
            self.db.execute,
            "INSERT INTO entries (priority, body, queued_at, queue) VALUES (?, ?, ?, ?)",
            (PRIORITIES.index(priority), encode_envelope(envelope), now_ms(), queue),
        )
        self._wakeup.set()
        return str(cur.lastrowid)

    async def enqueue_many(self, queue: QueueName, priority: Priority,
                           envelopes: Sequence[Envelope]) -> None:
        rows = [(PRIORITIES.index(priority), encode_envelope(e), now_ms(), queue, None)
                for e in envelopes]
        await self._insert(rows)

    async def schedule(self, queue: QueueName, priority: Priority, envelope: Envelope,
                       due_ms: int) -> None:
        await self._insert([(PRIORITIES.index(priority), encode_envelope(envelope), now_ms(),
                             queue, due_ms)])

    async def _insert(self, rows: list[tuple[Any, ...]]) -> None:
        def insert() -> None:
            with self.transaction():
                self.db.executemany("INSERT INTO entries (priority, body, queued_at, queue, "
                                    "due_at) VALUES (?, ?, ?, ?, ?)", rows)

        await self._run(insert)
        self._wakeup.set()

    def _claim_one(self, consumer: str, queues: Sequence[QueueName]) -> Delivery | None:
        now = now_ms()
        marks = ",".join("?" * len(queues))
        with self.transaction():
            row = self.db.execute(
                f"SELECT id, priority, body, queue FROM entries WHERE queue IN ({marks}) "
                "AND (due_at IS NULL OR due_at <= ?) AND (consumer IS NULL OR claimed_at < ?) "
                "ORDER BY priority, id LIMIT 1", (*queues, now, now - self.claim_idle_ms),
            ).fetchone()
            if row is None:
                return None
            self.db.execute(
                "UPDATE entries SET consumer = ?, claimed_at = ? WHERE id = ?",
                (consumer, now, row[0]),
            )
        return Delivery(PRIORITIES[row[1]], str(row[0]), decode_envelope(row[2]), 0, row[3])

    async def claim(self, consumer: str, block_s: float,
                    queues: Sequence[QueueName] = FANOUT) -> Delivery | None:
        deadline = time.monotonic() + block_s
        while True:
            self._wakeup.clear()
            delivery = await self._run(self._claim_one, consumer, queues)
            if delivery is not None:
                if (delivery.priority == "low"
                        and now_ms() - delivery.envelope.enqueued_at > self.low_max_age_ms):
                    await self._run(self._bump, "shed")
                    metrics.shed(delivery.queue, delivery.priority)
                    await self.dead_letter(delivery, "shed", "older than FEEDSVC_LOW_MAX_AGE")
                    continue
                return delivery
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            # Wake on a new entry, or re-check for expired claims now and then.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=min(remaining, 1.0))

    def _bump(self, name: str) -> None:
        self.db.execute(
            "INSERT INTO counters VALUES (?, 1) ON CONFLICT (name) DO UPDATE SET value = value + 1",
            (name,),
        )

    async def ack(self, delivery: Delivery) -> None:
        await self._run(
            self.db.execute, "DELETE FROM entries WHERE id = ?", (int(delivery.entry_id),)
        )

    async def touch(self, delivery: Delivery, consumer: str) -> None:
        await self._run(self.db.execute,
                        "UPDATE entries SET claimed_at = ? WHERE id = ? AND consumer = ?",
                        (now_ms(), int(delivery.entry_id), consumer))

    async def dead_letter(self, delivery: Delivery, reason: str, detail: str) -> None:
        record = DeadLetter(delivery.entry_id, delivery.priority, reason, detail[:1000],
                            now_ms(), delivery.envelope, queue=delivery.queue)

        def move() -> None:
            with self.transaction():
                self.db.execute(
                    "INSERT INTO dead_letters (body) VALUES (?)", (msgspec.msgpack.encode(record),)
                )
                self.db.execute("DELETE FROM entries WHERE id = ?", (int(delivery.entry_id),))

        await self._run(move)
        metrics.dead_lettered(delivery.queue, reason)

    async def bury(self, queue: QueueName, priority: Priority, envelope: Envelope,
                   reason: str, detail: str) -> None:
        record = DeadLetter("", priority, reason, detail[:1000], now_ms(), envelope,
                            queue=queue)
        await self._run(self.db.execute, "INSERT INTO dead_letters (body) VALUES (?)",
                        (msgspec.msgpack.encode(record),))
        metrics.dead_lettered(queue, reason)

    def _letters(self, rows: list[Any]) -> list[DeadLetter]:
        return [msgspec.structs.replace(_letter_decoder.decode(body), dlq_id=str(dlq_id))
                for dlq_id, body in rows]

    async def dead_letters(self, limit: int, before: str | None = None) -> list[DeadLetter]:
        if before and not _row_id(before):
            return []
        below = int(before) if before else None
        rows = await self._run(
            lambda: self.db.execute(
                "SELECT id, body FROM dead_letters WHERE ? IS NULL OR id < ? "
                "ORDER BY id DESC LIMIT ?", (below, below, limit)
            ).fetchall()
        )
        return self._letters(rows)

    async def dead_letter_get(self, dlq_id: str) -> DeadLetter | None:
        if not _row_id(dlq_id):
            return None
        rows = await self._run(lambda: self.db.execute(
            "SELECT id, body FROM dead_letters WHERE id = ?", (int(dlq_id),)).fetchall())
        letters = self._letters(rows)
        return letters[0] if letters else None

    async def replay(self, dlq_id: str) -> bool:
        letter = await self.dead_letter_get(dlq_id)
        if letter is None:
            return False
        envelope = msgspec.structs.replace(letter.envelope, enqueued_at=now_ms())

        def move() -> bool:
            with self.transaction():
                gone = self.db.execute("DELETE FROM dead_letters WHERE id = ?", (int(dlq_id),))
                if gone.rowcount != 1:
                    return False
                self.db.execute(
                    "INSERT INTO entries (priority, body, queued_at, queue) VALUES (?, ?, ?, ?)",
                    (PRIORITIES.index(letter.priority), encode_envelope(envelope), now_ms(),
                     letter.queue))
                return True

        moved = await self._run(move)
        self._wakeup.set()
        return moved

    # --- for the outbox sweeper -----------------------------------------------------------

    async def oldest_queued_ms(self, priority: Priority,
                               queue: QueueName = "fanout") -> int | None:
        row = await self._run(lambda: self.db.execute(
            "SELECT id, queued_at, body FROM entries WHERE queue = ? AND priority = ? "
            "ORDER BY id LIMIT 1", (queue, PRIORITIES.index(priority))).fetchone())
        if row is None:
            return None
        return int(row[1]) if row[1] is not None else decode_envelope(row[2]).enqueued_at

    async def try_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        return True  # one process owns the file

    async def prune_consumers(self, idle_s: float) -> int:
        return 0  # consumers are not registered anywhere

    async def move_due(self, now: int | None = None) -> int:
        """A scheduled entry is claimable in place once due by the wall clock; with ``now``
        (a test's clock, ahead of the wall's) those due by it are made claimable too."""
        if now is None:
            return 0
        cur = await self._run(self.db.execute,
                              "UPDATE entries SET due_at = NULL WHERE due_at <= ?", (now,))
        if cur.rowcount:
            self._wakeup.set()
        return int(cur.rowcount)

    async def stats(self) -> QueueStats:
        def query() -> QueueStats:
            depth: dict[str, int] = dict.fromkeys(PRIORITIES, 0)
            queued: dict[str, int] = dict.fromkeys(QUEUES, 0)
            scheduled = 0
            for queue, prio, waiting, count in self.db.execute(
                "SELECT queue, priority, due_at > ?, count(*) FROM entries "
                "GROUP BY queue, priority, due_at > ?", (now_ms(), now_ms())
            ):
                if waiting:
                    scheduled += int(count)
                    continue
                queued[queue] = queued.get(queue, 0) + int(count)
                if queue == "fanout":
                    depth[PRIORITIES[prio]] += int(count)
            dlq = self.db.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
            shed = self.db.execute("SELECT value FROM counters WHERE name = 'shed'").fetchone()
            return QueueStats(depth=depth, dead_letters=int(dlq),
                              shed=int(shed[0]) if shed else 0, queued=queued,
                              scheduled=scheduled)

        return await self._run(query)


    async def stream_stats(self) -> list[StreamStats]:
        def query() -> list[StreamStats]:
            now = now_ms()
            figures: dict[tuple[QueueName, Priority], tuple[int, int, int | None]] = {
                (q, p): (0, 0, None) for q in QUEUES for p in PRIORITIES}
            for queue, prio, depth, pending, oldest in self.db.execute(
                "SELECT queue, priority, count(*), "
                "sum(consumer IS NOT NULL AND claimed_at >= ?), min(queued_at) "
                "FROM entries WHERE due_at IS NULL OR due_at <= ? GROUP BY queue, priority",
                (now - self.claim_idle_ms, now),
            ):
                if (queue, PRIORITIES[prio]) in figures:
                    figures[queue, PRIORITIES[prio]] = (int(depth), int(pending or 0),
                                                        None if oldest is None else int(oldest))
            return [StreamStats(q, p, *figure) for (q, p), figure in figures.items()]

        return await self._run(query)

    # --- process reports ----------------------------------------------------------------

    async def put_report(self, process_id: str, body: bytes) -> None:
        await self._run(self.db.execute,
                        "INSERT INTO processes VALUES (?, ?, ?) ON CONFLICT (name) "
                        "DO UPDATE SET seen_at = excluded.seen_at, body = excluded.body",
                        (process_id, now_ms(), body))

    async def reports(self, within_s: float) -> list[tuple[int, bytes]]:
        now = now_ms()

        def query() -> list[tuple[int, bytes]]:
            self.db.execute("DELETE FROM processes WHERE seen_at < ?", (now - REPORTS_KEPT_MS,))
            return [(int(seen), bytes(body)) for seen, body in self.db.execute(
                "SELECT seen_at, body FROM processes WHERE seen_at >= ?",
                (now - int(within_s * 1000),))]

        return await self._run(query)

    async def drop_report(self, process_id: str) -> None:
        await self._run(self.db.execute, "DELETE FROM processes WHERE name = ?", (process_id,))


_letter_decoder = msgspec.msgpack.Decoder(DeadLetter)


def _row_id(text: str) -> bool:
    """A dead letter id this queue can have made: a row id (that fits SQLite's integer)."""
    return text.isascii() and text.isdigit() and len(text) <= 18
