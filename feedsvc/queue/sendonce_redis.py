"""Send-once claims in Redis (the ``SendOnce`` port of ``feedsvc/delivery/state.py``), on
the queue's client. One key per delivery, ``{prefix}:once:{delivery key}``: the holder's id
with a lease (``SET NX PX``) while a worker calls the provider, then ``sent`` for
``SENT_TTL_S``. Claims are one round trip (SET and GET pipelined, for all of a delivery's targets at
once), the marks another."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from feedsvc.delivery.state import SENT_TTL_S, ClaimState
from feedsvc.queue.redis import RedisQueue, redis_errors

_SENT = b"sent"
# Deletes KEYS[1] only while ARGV[1] holds it.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisSendOnce:
    """``SendOnce`` on Redis; see the module docstring."""

    def __init__(self, queue: RedisQueue) -> None:
        self.redis: Any = queue.redis
        self.prefix = queue.prefix

    def _key(self, key: str) -> str:
        return f"{self.prefix}:once:{key}"

    async def claim(self, key: str, holder: str, lease_s: float) -> ClaimState:
        return (await self.claim_many([key], holder, lease_s))[0]

    async def claim_many(self, keys: Sequence[str], holder: str, lease_s: float
                         ) -> list[ClaimState]:
        if not keys:
            return []
        lease_ms = max(1, int(lease_s * 1000))
        with redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.set(self._key(key), holder, nx=True, px=lease_ms)
                    pipe.get(self._key(key))
                replies = await pipe.execute()
        mine = holder.encode()
        # Taken now, or already ours (a claim retried after a lost answer).
        return ["claimed" if taken or value == mine else "sent" if value == _SENT else "busy"
                for taken, value in zip(replies[::2], replies[1::2], strict=True)]

    async def mark_sent_many(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        with redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.set(self._key(key), _SENT, ex=SENT_TTL_S)
                await pipe.execute()

    async def release(self, key: str, holder: str) -> None:
        with redis_errors():
            await self.redis.eval(_RELEASE, 1, self._key(key), holder)

    async def forget(self, key: str) -> None:
        with redis_errors():
            await self.redis.delete(self._key(key))
