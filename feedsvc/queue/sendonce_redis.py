"""Send-once claims in Redis (the ``SendOnce`` port of ``feedsvc/delivery/state.py``), on
the queue's client. One key per delivery, ``{prefix}:once:{delivery key}``: the holder's id
with a lease (``SET NX PX``) while a worker calls the provider, then ``sent`` for
``SENT_TTL_S``. A claim is one round trip (SET and GET pipelined), the mark another."""

from __future__ import annotations

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
        name = self._key(key)
        with redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.set(name, holder, nx=True, px=max(1, int(lease_s * 1000)))
                pipe.get(name)
                taken, value = await pipe.execute()
        if taken or value == holder.encode():  # (a claim retried after a lost answer)
            return "claimed"
        return "sent" if value == _SENT else "busy"

    async def mark_sent(self, key: str) -> None:
        with redis_errors():
            await self.redis.set(self._key(key), _SENT, ex=SENT_TTL_S)

    async def release(self, key: str, holder: str) -> None:
        with redis_errors():
            await self.redis.eval(_RELEASE, 1, self._key(key), holder)

    async def forget(self, key: str) -> None:
        with redis_errors():
            await self.redis.delete(self._key(key))
