"""Embedded queue: the same contract as the Redis Streams queue, on a SQLite file.

For the embedded single-process mode. Entries are rows; ``claim`` marks a row with its
consumer and time, ``ack`` deletes it. Entries claimed by a consumer that has been silent
for ``claim_idle`` are claimable again, and on open every claim left by a previous process
is released at once (one process owns the file), so nothing accepted is lost on a crash.
Waiting consumers are woken by an in-process event rather than polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import msgspec

from feedsvc.clock import now_ms
from feedsvc.model import PRIORITIES, Envelope, Priority, decode_envelope, encode_envelope
from feedsvc.queue.base import DeadLetter, Delivery, QueueStats
from feedsvc.sqlite_file import SqliteFile

_SCHEMA = """
PRAGMA journal_mode=WAL;
PRAGMA synchronous=NORMAL;
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT, priority INTEGER NOT NULL, body BLOB NOT NULL,
    consumer TEXT, claimed_at INTEGER);
CREATE INDEX IF NOT EXISTS entries_order ON entries (priority, id);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


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
        # One process owns the file: claims left by a previous one are released at once.
        self.db.execute("UPDATE entries SET consumer = NULL, claimed_at = NULL")

    async def enqueue(self, priority: Priority, envelope: Envelope) -> str:
        cur = await self._run(
            self.db.execute, "INSERT INTO entries (priority, body) VALUES (?, ?)",
            (PRIORITIES.index(priority), encode_envelope(envelope)),
        )
        self._wakeup.set()
        return str(cur.lastrowid)

    def _claim_one(self, consumer: str) -> Delivery | None:
        now = now_ms()
        with self.db:
            row = self.db.execute(
                "SELECT id, priority, body FROM entries WHERE consumer IS NULL "
                "OR claimed_at < ? ORDER BY priority, id LIMIT 1", (now - self.claim_idle_ms,),
            ).fetchone()
            if row is None:
                return None
            self.db.execute(
                "UPDATE entries SET consumer = ?, claimed_at = ? WHERE id = ?",
                (consumer, now, row[0]),
            )
        return Delivery(PRIORITIES[row[1]], str(row[0]), decode_envelope(row[2]))

    async def claim(self, consumer: str, block_s: float) -> Delivery | None:
        deadline = time.monotonic() + block_s
        while True:
            self._wakeup.clear()
            delivery = await self._run(self._claim_one, consumer)
            if delivery is not None:
                if (delivery.priority == "low"
                        and now_ms() - delivery.envelope.enqueued_at > self.low_max_age_ms):
                    await self._run(self._bump, "shed")
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

    async def dead_letter(self, delivery: Delivery, reason: str, detail: str) -> None:
        record = DeadLetter(delivery.entry_id, delivery.priority, reason, detail[:1000],
                            now_ms(), delivery.envelope)

        def move() -> None:
            with self.db:
                self.db.execute(
                    "INSERT INTO dead_letters (body) VALUES (?)", (msgspec.msgpack.encode(record),)
                )
                self.db.execute("DELETE FROM entries WHERE id = ?", (int(delivery.entry_id),))

        await self._run(move)

    async def dead_letters(self, limit: int) -> list[DeadLetter]:
        rows = await self._run(
            lambda: self.db.execute(
                "SELECT body FROM dead_letters ORDER BY id DESC LIMIT ?", (limit,)
            ).fetchall()
        )
        decoder = msgspec.msgpack.Decoder(DeadLetter)
        return [decoder.decode(r[0]) for r in rows]

    async def stats(self) -> QueueStats:
        def query() -> QueueStats:
            depth: dict[str, int] = dict.fromkeys(PRIORITIES, 0)
            for prio, count in self.db.execute(
                "SELECT priority, count(*) FROM entries GROUP BY priority"
            ):
                depth[PRIORITIES[prio]] = int(count)
            dlq = self.db.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
            shed = self.db.execute("SELECT value FROM counters WHERE name = 'shed'").fetchone()
            return QueueStats(depth=depth, dead_letters=int(dlq),
                              shed=int(shed[0]) if shed else 0)

        return await self._run(query)
