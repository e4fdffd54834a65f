"""Read-cache versions and notices in Redis (the ``Notices`` port of
``feedsvc/readcache.py``), on the queue's client. Keys, under the queue's prefix:

- ``{prefix}:rv:f:{user}``: the version of a user's following list, a random token
  replaced (``SET EX``) by every follow change before it is answered. A token, not a
  counter: a key that expired and was set again can never repeat an old version.
- ``{prefix}:rv:pullset``: the version of the pull set, replaced when an author changes mode.
- ``{prefix}:notices``: a stream of authors' pull posts (field ``a``, the author; ``p``, the
  process that wrote it, which has applied it already), capped near ``STREAM_MAX`` entries.
  Every API process reads it with a blocking ``XREAD`` from where it last read; after an
  error it forgets every head (it may have missed notices) and reads on from the end.

A read gets both versions in one round trip (``MGET``; a pipeline on Redis Cluster).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Sequence
from typing import Any

from redis.asyncio.cluster import RedisCluster

from feedsvc.errors import RetryableError
from feedsvc.queue.redis import RedisQueue, redis_errors
from feedsvc.readcache import NoticeSink

log = logging.getLogger(__name__)

VERSION_TTL_S = 7 * 86_400  # far longer than a cached list lives (FEEDSVC_FOLLOWING_TTL)
STREAM_MAX = 10_000
BLOCK_MS = 1_000
RETRY_S = 1.0


def _token() -> str:
    return secrets.token_hex(8)


class RedisNotices:
    """``Notices`` on Redis; see the module docstring."""

    def __init__(self, queue: RedisQueue) -> None:
        self.redis: Any = queue.redis
        self.prefix = queue.prefix
        self.cluster = isinstance(queue.redis, RedisCluster)
        self.stream = f"{self.prefix}:notices"
        self.pull_set_key = f"{self.prefix}:rv:pullset"
        self.process = _token()
        self._sinks: list[NoticeSink] = []

    def _following_key(self, user_id: str) -> str:
        return f"{self.prefix}:rv:f:{user_id}"

    def subscribe(self, sink: NoticeSink) -> None:
        self._sinks.append(sink)

    async def versions(self, user_id: str) -> tuple[str | None, str | None]:
        keys = (self._following_key(user_id), self.pull_set_key)
        with redis_errors():
            if self.cluster:  # the two keys live in different slots
                async with self.redis.pipeline(transaction=False) as pipe:
                    for key in keys:
                        pipe.get(key)
                    following, pull_set = await pipe.execute()
            else:
                following, pull_set = await self.redis.mget(keys)
        return (following.decode() if following is not None else None,
                pull_set.decode() if pull_set is not None else None)

    async def following_changed(self, user_ids: Sequence[str]) -> None:
        users = list(dict.fromkeys(user_ids))
        with redis_errors():
            for start in range(0, len(users), 1_000):
                async with self.redis.pipeline(transaction=False) as pipe:
                    for user_id in users[start:start + 1_000]:
                        pipe.set(self._following_key(user_id), _token(), ex=VERSION_TTL_S)
                    await pipe.execute()

    async def pull_set_changed(self) -> None:
        with redis_errors():
            await self.redis.set(self.pull_set_key, _token(), ex=VERSION_TTL_S)

    async def author_posted(self, author_id: str) -> None:
        for sink in self._sinks:
            sink.author_posted(author_id)
        with redis_errors():
            await self.redis.xadd(self.stream, {"a": author_id, "p": self.process},
                                  maxlen=STREAM_MAX, approximate=True)

    async def listen(self) -> None:
        """Apply other processes' notices to the sinks until cancelled."""
        last: str | None = None
        while True:
            try:
                if last is None:
                    last = await self._tail()
                with redis_errors():
                    reply = await self.redis.xread({self.stream: last}, count=1_000,
                                                   block=BLOCK_MS)
            except RetryableError as exc:
                log.warning("read-cache notices interrupted, heads dropped: %s", exc)
                for sink in self._sinks:
                    sink.reset()
                last = None
                await asyncio.sleep(RETRY_S)
                continue
            for _stream, entries in reply or ():
                for entry_id, fields in entries:
                    last = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                    if fields.get(b"p", b"").decode() == self.process:
                        continue
                    author = fields.get(b"a", b"").decode()
                    for sink in self._sinks:
                        sink.author_posted(author)

    async def _tail(self) -> str:
        """The id of the stream's newest entry ("0-0" when it is empty)."""
        with redis_errors():
            newest = await self.redis.xrevrange(self.stream, count=1)
        if not newest:
            return "0-0"
        entry_id = newest[0][0]
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
