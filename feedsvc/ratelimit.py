"""Rate limits per caller: a token bucket per service key and per user (API middleware).

``FEEDSVC_RATE_LIMIT_SERVICE`` / ``FEEDSVC_RATE_LIMIT_USER`` (``1000/s``, ``20/s``, ``600/m``;
unset: no limit) give each caller a bucket holding that many tokens, refilled evenly over
the period; a request takes one. An empty bucket answers ``429`` with ``Retry-After`` and
the IETF draft's ``RateLimit-Limit``, ``RateLimit-Remaining``, ``RateLimit-Reset`` and
``RateLimit-Policy`` headers (sent on every limited caller's answers), before the handler
runs: a rate-limited request changes nothing.

The bucket arithmetic is the pure ``take_token``; two ports keep the state: ``LocalBuckets``
(in process, the embedded backend: one process) and ``RedisBuckets`` (one Lua script per
request, so every API process shares a caller's bucket; the Cassandra + Redis backend, with
its own Redis client). A limiter whose Redis does not answer lets requests through (logged
once a minute): rate limiting protects the service, it must not become its outage.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio as aioredis

from feedsvc.errors import RetryableError
from feedsvc.queue.redis import cluster_client, redis_errors

log = logging.getLogger(__name__)

_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*(s|m|h)\s*$")
_PERIOD_S = {"s": 1.0, "m": 60.0, "h": 3600.0}
LOCAL_MAX_KEYS = 100_000  # LocalBuckets forgets the least recently seen callers past this


@dataclass(frozen=True)
class Rate:
    """``tokens`` requests per ``period_s`` seconds, with a burst of ``tokens``."""

    tokens: int
    period_s: float

    @classmethod
    def parse(cls, text: str) -> Rate:
        """``"1000/s"``, ``"20/s"``, ``"600/m"``, ``"5/10s"`` -> Rate."""
        match = _RATE.match(text)
        if not match or int(match.group(1)) <= 0:
            raise ValueError(f"not a rate: {text!r} (use e.g. 20/s, 600/m)")
        every = int(match.group(2) or 1)
        if every <= 0:
            raise ValueError(f"not a rate: {text!r}")
        return cls(int(match.group(1)), every * _PERIOD_S[match.group(3)])

    @property
    def policy(self) -> str:
        return f"{self.tokens};w={math.ceil(self.period_s)}"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset_s: int  # seconds until the bucket is full again
    retry_after_s: int  # seconds until one token is there (0 when allowed)

    def headers(self, rate: Rate) -> dict[str, str]:
        out = {"RateLimit-Limit": str(self.limit), "RateLimit-Remaining": str(self.remaining),
               "RateLimit-Reset": str(self.reset_s), "RateLimit-Policy": rate.policy}
        if not self.allowed:
            out["Retry-After"] = str(self.retry_after_s)
        return out


def take_token(tokens: float, last_s: float, now_s: float,
               rate: Rate) -> tuple[Decision, float]:
    """One request against a bucket that held ``tokens`` at ``last_s``: the decision and the
    tokens left now."""
    per_s = rate.tokens / rate.period_s
    level = min(float(rate.tokens), tokens + max(0.0, now_s - last_s) * per_s)
    allowed = level >= 1.0
    if allowed:
        level -= 1.0
    retry = 0 if allowed else math.ceil((1.0 - level) / per_s)
    reset = math.ceil((rate.tokens - level) / per_s)
    return Decision(allowed, rate.tokens, int(level), reset, retry), level


class Buckets(Protocol):
    async def take(self, key: str, rate: Rate) -> Decision: ...

    async def close(self) -> None: ...


class LocalBuckets:
    """Buckets in this process (the embedded backend runs one API process)."""

    def __init__(self) -> None:
        self._state: OrderedDict[str, tuple[float, float]] = OrderedDict()

    async def take(self, key: str, rate: Rate) -> Decision:
        now = time.monotonic()
        tokens, last = self._state.pop(key, (float(rate.tokens), now))
        decision, left = take_token(tokens, last, now, rate)
        self._state[key] = (left, now)
        if len(self._state) > LOCAL_MAX_KEYS:
            self._state.popitem(last=False)
        return decision

    async def close(self) -> None:
        self._state.clear()


# KEYS[1] bucket; ARGV: tokens, period_ms. Returns {allowed, remaining, reset_ms, retry_ms}.
# The server's clock is used so that every API process agrees on the refill.
_TAKE = """
local capacity = tonumber(ARGV[1])
local period_ms = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or capacity
local last = tonumber(state[2]) or now
local per_ms = capacity / period_ms
local level = math.min(capacity, tokens + math.max(0, now - last) * per_ms)
local allowed = 0
if level >= 1 then
  allowed = 1
  level = level - 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(level), 'ts', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(period_ms * 2))
local retry = 0
if allowed == 0 then retry = math.ceil((1 - level) / per_ms) end
return {allowed, math.floor(level), math.ceil((capacity - level) / per_ms), retry}
"""


class RedisBuckets:
    """Buckets in Redis, shared by every API process (its own client)."""

    def __init__(self, client: Any, prefix: str) -> None:  # Redis, or RedisCluster
        self.redis, self.prefix = client, prefix
        self._script = client.register_script(_TAKE)
        self._warned_at = -math.inf

    @classmethod
    def open(cls, url: str, prefix: str, *, cluster: bool = False) -> RedisBuckets:
        options: dict[str, Any] = {"socket_timeout": 1.0, "socket_connect_timeout": 1.0}
        # A plain client on one node of a Redis Cluster is answered MOVED for most keys.
        return cls(cluster_client(url, **options) if cluster
                   else aioredis.Redis.from_url(url, **options), prefix)

    async def take(self, key: str, rate: Rate) -> Decision:
        try:
            with redis_errors():
                allowed, remaining, reset_ms, retry_ms = await self._script(
                    keys=[f"{self.prefix}:ratelimit:{key}"],
                    args=[rate.tokens, int(rate.period_s * 1000)])
        except (RetryableError, OSError) as exc:
            if time.monotonic() - self._warned_at > 60:
                self._warned_at = time.monotonic()
                log.warning("rate limits not applied: Redis does not answer (%s)", exc)
            return Decision(True, rate.tokens, rate.tokens, 0, 0)
        return Decision(bool(allowed), rate.tokens, int(remaining),
                        math.ceil(int(reset_ms) / 1000), math.ceil(int(retry_ms) / 1000))

    async def close(self) -> None:
        await self.redis.aclose()
