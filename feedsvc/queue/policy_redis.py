"""Delivery policy state in Redis (the ``PolicyState`` port of
``feedsvc/delivery/state.py``), on the queue's client:

- ``{prefix}:rate:{window}``: a hash, notification -> its order of arrival (one script
  gives a new member the next number and a repeat its own);
- ``{prefix}:held:{window}``: a hash, order (zero-padded) -> the held item;
- ``{prefix}:mark:{key}``: a flag (a notification opened).

Each key expires on its own; nothing is ever deleted by hand.
"""

from __future__ import annotations

from typing import Any

from feedsvc.queue.redis import RedisQueue, redis_errors

# KEYS[1] the window's hash; ARGV[1] the member, ARGV[2] the ttl in ms.
_ARRIVE = """
local n = redis.call('HGET', KEYS[1], ARGV[1])
if n then return tonumber(n) end
n = redis.call('HLEN', KEYS[1]) + 1
redis.call('HSET', KEYS[1], ARGV[1], n)
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return n
"""


class RedisPolicyState:
    """``PolicyState`` on Redis; see the module docstring."""

    def __init__(self, queue: RedisQueue) -> None:
        self.redis: Any = queue.redis
        self.prefix = queue.prefix

    async def arrive(self, window: str, member: str, ttl_s: float) -> int:
        with redis_errors():
            order = await self.redis.eval(_ARRIVE, 1, f"{self.prefix}:rate:{window}", member,
                                          max(1, int(ttl_s * 1000)))
        return int(order)

    async def hold(self, window: str, order: int, item: bytes, ttl_s: float) -> None:
        name = f"{self.prefix}:held:{window}"
        with redis_errors():
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(name, f"{order:010d}", item)
                pipe.expire(name, max(1, int(ttl_s)))
                await pipe.execute()

    async def held(self, window: str) -> list[bytes]:
        with redis_errors():
            items: dict[bytes, bytes] = await self.redis.hgetall(
                f"{self.prefix}:held:{window}")
        return [items[k] for k in sorted(items)]

    async def mark(self, key: str, ttl_s: float) -> None:
        with redis_errors():
            await self.redis.set(f"{self.prefix}:mark:{key}", b"1", ex=max(1, int(ttl_s)))

    async def marked(self, key: str) -> bool:
        with redis_errors():
            return bool(await self.redis.exists(f"{self.prefix}:mark:{key}"))
