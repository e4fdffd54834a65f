"""Delivery policy state in the embedded queue file (the ``PolicyState`` port of
``feedsvc/delivery/state.py``): arrivals per rate window, held items, marks; each row
carries its expiry, and expired rows are removed now and then as new ones are written."""

from __future__ import annotations

from feedsvc.clock import now_ms
from feedsvc.queue.embedded import EmbeddedQueue

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rate_arrivals (
    win TEXT NOT NULL, member TEXT NOT NULL, ordinal INTEGER NOT NULL,
    until_ms INTEGER NOT NULL, PRIMARY KEY (win, member));
CREATE TABLE IF NOT EXISTS rate_held (
    win TEXT NOT NULL, ordinal INTEGER NOT NULL, item BLOB NOT NULL,
    until_ms INTEGER NOT NULL, PRIMARY KEY (win, ordinal));
CREATE TABLE IF NOT EXISTS policy_marks (key TEXT PRIMARY KEY, until_ms INTEGER NOT NULL);
"""
PRUNE_EVERY = 1_000  # writes between removals of expired rows


class SqlitePolicyState:
    """``PolicyState`` on the embedded queue's file; see the module docstring."""

    def __init__(self, queue: EmbeddedQueue) -> None:
        self.queue = queue
        self._writes = 0

    @classmethod
    async def open(cls, queue: EmbeddedQueue) -> SqlitePolicyState:
        await queue._run(queue.db.executescript, _SCHEMA)
        return cls(queue)

    def _prune(self, now: int) -> None:
        self._writes += 1
        if self._writes % PRUNE_EVERY == 0:
            for table in ("rate_arrivals", "rate_held", "policy_marks"):
                self.queue.db.execute(f"DELETE FROM {table} WHERE until_ms <= ?", (now,))

    async def arrive(self, window: str, member: str, ttl_s: float) -> int:
        def arrive() -> int:
            db, now = self.queue.db, now_ms()
            with self.queue.transaction():
                row = db.execute("SELECT ordinal FROM rate_arrivals WHERE win = ? AND "
                                 "member = ? AND until_ms > ?", (window, member, now)
                                 ).fetchone()
                if row is not None:
                    return int(row[0])
                first = db.execute("SELECT count(*), min(until_ms) FROM rate_arrivals "
                                   "WHERE win = ? AND until_ms > ?", (window, now)
                                   ).fetchone()
                order = int(first[0]) + 1
                until = first[1] if first[1] is not None else now + int(ttl_s * 1000)
                db.execute("INSERT OR REPLACE INTO rate_arrivals VALUES (?, ?, ?, ?)",
                           (window, member, order, until))
                self._prune(now)
                return order

        return await self.queue._run(arrive)

    async def hold(self, window: str, order: int, item: bytes, ttl_s: float) -> None:
        def hold() -> None:
            now = now_ms()
            self.queue.db.execute("INSERT OR REPLACE INTO rate_held VALUES (?, ?, ?, ?)",
                                  (window, order, item, now + int(ttl_s * 1000)))
            self._prune(now)

        await self.queue._run(hold)

    async def held(self, window: str) -> list[bytes]:
        def held() -> list[bytes]:
            rows = self.queue.db.execute(
                "SELECT item FROM rate_held WHERE win = ? AND until_ms > ? "
                "ORDER BY ordinal", (window, now_ms())).fetchall()
            return [bytes(row[0]) for row in rows]

        return await self.queue._run(held)

    async def mark(self, key: str, ttl_s: float) -> None:
        def mark() -> None:
            now = now_ms()
            self.queue.db.execute("INSERT OR REPLACE INTO policy_marks VALUES (?, ?)",
                                  (key, now + int(ttl_s * 1000)))
            self._prune(now)

        await self.queue._run(mark)

    async def marked(self, key: str) -> bool:
        row = await self.queue._run(lambda: self.queue.db.execute(
            "SELECT 1 FROM policy_marks WHERE key = ? AND until_ms > ?",
            (key, now_ms())).fetchone())
        return row is not None
