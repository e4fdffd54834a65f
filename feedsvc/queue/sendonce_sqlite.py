"""Send-once claims in the embedded queue file (the ``SendOnce`` port of
``feedsvc/delivery/state.py``): one row per delivery key, a holder with a lease, or sent
(remembered for ``SENT_TTL_S``)."""

from __future__ import annotations

from collections.abc import Sequence

from feedsvc.clock import now_ms
from feedsvc.delivery.state import SENT_TTL_S, ClaimState
from feedsvc.queue.embedded import EmbeddedQueue

_SCHEMA = """
CREATE TABLE IF NOT EXISTS send_once (
    key TEXT PRIMARY KEY, holder TEXT, until_ms INTEGER NOT NULL, sent INTEGER NOT NULL);
"""


class SqliteSendOnce:
    """``SendOnce`` on the embedded queue's file; see the module docstring."""

    def __init__(self, queue: EmbeddedQueue) -> None:
        self.queue = queue

    @classmethod
    async def open(cls, queue: EmbeddedQueue) -> SqliteSendOnce:
        await queue._run(queue.db.executescript, _SCHEMA)
        return cls(queue)

    async def claim(self, key: str, holder: str, lease_s: float) -> ClaimState:
        return (await self.claim_many([key], holder, lease_s))[0]

    async def claim_many(self, keys: Sequence[str], holder: str, lease_s: float
                         ) -> list[ClaimState]:
        def claim() -> list[ClaimState]:
            db, now = self.queue.db, now_ms()
            states: list[ClaimState] = []
            with self.queue.transaction():
                for key in keys:
                    row = db.execute("SELECT sent, until_ms, holder FROM send_once WHERE "
                                     "key = ?", (key,)).fetchone()
                    # A live lease of another holder, or sent; the caller's own lease is
                    # claimed again (a task redone by the worker that holds it).
                    if row is not None and row[1] > now and (row[0] or row[2] != holder):
                        states.append("sent" if row[0] else "busy")
                        continue
                    db.execute("INSERT OR REPLACE INTO send_once VALUES (?, ?, ?, 0)",
                               (key, holder, now + max(1, int(lease_s * 1000))))
                    states.append("claimed")
            return states

        return await self.queue._run(claim) if keys else []

    async def mark_sent_many(self, keys: Sequence[str]) -> None:
        until = now_ms() + SENT_TTL_S * 1000
        await self.queue.write_many("INSERT OR REPLACE INTO send_once VALUES (?, NULL, ?, 1)",
                                    [(key, until) for key in keys])

    async def release(self, key: str, holder: str) -> None:
        await self.queue._run(self.queue.db.execute,
                              "DELETE FROM send_once WHERE key = ? AND holder = ? AND sent = 0",
                              (key, holder))

    async def forget(self, key: str) -> None:
        await self.queue._run(self.queue.db.execute, "DELETE FROM send_once WHERE key = ?",
                              (key,))
