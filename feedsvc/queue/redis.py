"""Redis Streams queue: one stream per priority, one consumer group, XACK+XDEL on ack.

Key names (all of them, under one prefix, default ``feedsvc``):

- ``{prefix}:q:high``, ``{prefix}:q:medium``, ``{prefix}:q:low``: the priority streams
  (field ``e`` = msgpack Envelope). Acknowledged entries are deleted, so XLEN is the depth.
- ``{prefix}:dlq``: the dead-letter stream (reason ``shed``, ``error``, ``poison``).
- ``{prefix}:stats:shed``: how many low entries were shed.
- ``{prefix}:lease:{name}``: leases (``SET NX PX``), e.g. the outbox sweeper's.

Consumer group ``fanout``. A consumer first reclaims entries idle for ``claim_idle`` seconds
(XAUTOCLAIM: their consumer died), then reads new entries stream by stream in priority
order; when all are empty it blocks on all three at once.

Every Redis error becomes ``RetryableError`` in one place (``_redis_errors``). The client
fails fast: a request unanswered within ``request_timeout`` fails, a broken connection is
retried once, and pooled connections are health-checked, so a restarted Redis is used
again at once.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError, ResponseError

from feedsvc.clock import now_ms
from feedsvc.errors import RetryableError
from feedsvc.model import PRIORITIES, Envelope, Priority, decode_envelope, encode_envelope
from feedsvc.queue.base import DeadLetter, Delivery, QueueStats

GROUP = "fanout"
MAX_CONNECTIONS = 256  # per process: each consumer holds one while it blocks on a read
_FIELD = b"e"
_RAW = b"raw"
# Takes a lease that is free, or renews it for the holder that has it.
_RENEW = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""


@contextmanager
def _redis_errors() -> Iterator[None]:
    """The adapter's one exception map: Redis is (briefly) unavailable -> RetryableError."""
    try:
        yield
    except RedisError as exc:
        raise RetryableError(f"redis: {exc}") from exc


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisQueue:
    """``Queue`` on Redis Streams; see the module docstring."""

    def __init__(self, client: aioredis.Redis, *, prefix: str = "feedsvc",
                 claim_idle: float = 60.0, low_max_age: float = 3600.0) -> None:
        self.redis = client
        self.prefix = prefix
        self.claim_idle_ms = int(claim_idle * 1000)
        self.low_max_age_ms = int(low_max_age * 1000)
        self.streams = {p: f"{prefix}:q:{p}" for p in PRIORITIES}
        self.dlq = f"{prefix}:dlq"
        self.shed_key = f"{prefix}:stats:shed"
        self._buffer: dict[str, list[Delivery]] = {}
        self._last_reclaim: dict[str, float] = {}

    @classmethod
    async def open(cls, url: str, *, request_timeout: float = 5.0,
                   **kwargs: Any) -> RedisQueue:
        # A blocking pool: past MAX_CONNECTIONS a request waits for a free connection (up
        # to request_timeout) instead of failing with "Too many connections" at once, which
        # under a burst of posts left their fan-out to the sweeper.
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=MAX_CONNECTIONS, timeout=request_timeout,
            socket_connect_timeout=min(2.0, request_timeout),
            # Above the longest blocking read (``claim``'s block_s, a second or two).
            socket_timeout=max(request_timeout, 3.0),
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=1),
            health_check_interval=5,
        )
        client = aioredis.Redis.from_pool(pool)  # closes the pool with the client
        queue = cls(client, **kwargs)
        try:
            await queue._create_groups()
        except RetryableError as exc:
            await client.aclose()
            raise RetryableError(f"cannot reach Redis: {exc}") from exc
        return queue

    async def _create_groups(self) -> None:
        """The consumer group on every stream (again after a Redis that lost its data)."""
        with _redis_errors():
            for stream in self.streams.values():
                try:
                    await self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
                except ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise

    async def ping(self) -> None:
        with _redis_errors():
            await self.redis.ping()

    async def close(self) -> None:
        await self.redis.aclose()

    async def enqueue(self, priority: Priority, envelope: Envelope) -> str:
        with _redis_errors():
            entry_id = await self.redis.xadd(
                self.streams[priority], {_FIELD: encode_envelope(envelope)}
            )
        return _text(entry_id)

    async def _deliveries(self, priority: Priority, entries: list[Any]) -> list[Delivery]:
        out = []
        for entry_id, fields in entries:
            if not fields:  # deleted while pending
                continue
            eid = _text(entry_id)
            try:
                out.append(Delivery(priority, eid, decode_envelope(fields[_FIELD])))
            except (KeyError, msgspec.DecodeError) as exc:
                await self._dead_letter_raw(priority, eid, fields, repr(exc))
        return out

    async def _dead_letter_raw(self, priority: Priority, entry_id: str,
                               fields: dict[bytes, bytes], detail: str) -> None:
        """An entry no version of the code can read (say, after an incompatible deploy):
        kept as it is in the dead-letter stream with reason ``poison``, then removed."""
        stream = self.streams[priority]
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.dlq, {_RAW: msgspec.msgpack.encode(
                {"entry_id": entry_id, "priority": priority, "reason": "poison",
                 "detail": detail[:1000], "fields": fields})})
            pipe.xack(stream, GROUP, entry_id)
            pipe.xdel(stream, entry_id)
            await pipe.execute()

    async def claim(self, consumer: str, block_s: float) -> Delivery | None:
        with _redis_errors():
            try:
                return await self._claim(consumer, block_s)
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                # Redis came back without its data (no persistence, a failover to a replica
                # that never had the stream): make the group again; lost entries are the
                # outbox sweeper's to queue again.
                await self._create_groups()
                return await self._claim(consumer, block_s)

    async def _claim(self, consumer: str, block_s: float) -> Delivery | None:
        buffer = self._buffer.setdefault(consumer, [])
        deadline = time.monotonic() + block_s
        while True:
            read_any = True
            while not buffer and read_any:  # unreadable entries are dead-lettered: read on
                read_any = await self._fill(consumer, buffer, deadline - time.monotonic())
            if not buffer:
                return None
            buffer.sort(key=lambda d: PRIORITIES.index(d.priority))
            delivery = buffer.pop(0)
            if not self._expired(delivery):
                return delivery
            await self.shed(delivery)

    async def _fill(self, consumer: str, buffer: list[Delivery], block_s: float) -> bool:
        """Reclaim idle entries of dead consumers, else read new entries by priority,
        else block on all streams for up to ``block_s``. True when any entry was read."""
        now = time.monotonic()
        if now - self._last_reclaim.get(consumer, 0.0) >= self.claim_idle_ms / 2000:
            self._last_reclaim[consumer] = now
            for priority in PRIORITIES:
                reply: Any = await self.redis.xautoclaim(
                    self.streams[priority], GROUP, consumer,
                    min_idle_time=self.claim_idle_ms, start_id="0-0", count=16,
                )
                buffer.extend(await self._deliveries(priority, reply[1]))
            if buffer:
                return True
        for priority in PRIORITIES:
            read: Any = await self.redis.xreadgroup(
                GROUP, consumer, {self.streams[priority]: ">"}, count=1
            )
            if read:
                buffer.extend(await self._deliveries(priority, read[0][1]))
                return True
        if block_s > 0:
            blocked: Any = await self.redis.xreadgroup(
                GROUP, consumer, {s: ">" for s in self.streams.values()}, count=1,
                block=max(1, int(block_s * 1000)),
            )
            by_stream = {v: k for k, v in self.streams.items()}
            for stream, entries in blocked or []:
                name = stream.decode() if isinstance(stream, bytes) else stream
                buffer.extend(await self._deliveries(by_stream[name], entries))
            return bool(blocked)
        return False

    def _expired(self, delivery: Delivery) -> bool:
        return (delivery.priority == "low"
                and now_ms() - delivery.envelope.enqueued_at > self.low_max_age_ms)

    async def shed(self, delivery: Delivery) -> None:
        await self.redis.incr(self.shed_key)
        await self._dead_letter(delivery, "shed", "older than FEEDSVC_LOW_MAX_AGE")

    async def ack(self, delivery: Delivery) -> None:
        stream = self.streams[delivery.priority]
        with _redis_errors():
            try:
                async with self.redis.pipeline(transaction=True) as pipe:
                    pipe.xack(stream, GROUP, delivery.entry_id)
                    pipe.xdel(stream, delivery.entry_id)
                    await pipe.execute()
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                # Redis lost the stream since the claim: the entry is gone already.

    async def dead_letter(self, delivery: Delivery, reason: str, detail: str) -> None:
        with _redis_errors():
            try:
                await self._dead_letter(delivery, reason, detail)
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self._create_groups()  # Redis lost the stream: record it again
                await self._dead_letter(delivery, reason, detail)

    async def _dead_letter(self, delivery: Delivery, reason: str, detail: str) -> None:
        """Record and acknowledge in one transaction: never both lost nor both kept."""
        record = DeadLetter(delivery.entry_id, delivery.priority, reason, detail[:1000],
                            now_ms(), delivery.envelope)
        stream = self.streams[delivery.priority]
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.dlq, {_FIELD: msgspec.msgpack.encode(record)})
            pipe.xack(stream, GROUP, delivery.entry_id)
            pipe.xdel(stream, delivery.entry_id)
            await pipe.execute()

    def _letters(self, entries: Any) -> list[DeadLetter]:
        """Decoded dead letters with their ids; raw (unreadable) entries are left out."""
        out = []
        for dlq_id, fields in entries:
            if _FIELD in fields:
                letter = _letter_decoder.decode(fields[_FIELD])
                out.append(msgspec.structs.replace(letter, dlq_id=_text(dlq_id)))
        return out

    async def dead_letters(self, limit: int, before: str | None = None) -> list[DeadLetter]:
        with _redis_errors():
            entries: Any = await self.redis.xrevrange(
                self.dlq, max=f"({before}" if before else "+", count=limit)
        return self._letters(entries)

    async def dead_letter_get(self, dlq_id: str) -> DeadLetter | None:
        with _redis_errors():
            entries: Any = await self.redis.xrange(self.dlq, min=dlq_id, max=dlq_id, count=1)
        letters = self._letters(entries)
        return letters[0] if letters else None

    async def replay(self, dlq_id: str) -> bool:
        letter = await self.dead_letter_get(dlq_id)
        if letter is None:
            return False
        # A new entry with a new queued time: a low task is not shed again at once.
        envelope = msgspec.structs.replace(letter.envelope, enqueued_at=now_ms())
        with _redis_errors():
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.xadd(self.streams[letter.priority], {_FIELD: encode_envelope(envelope)})
                pipe.xdel(self.dlq, dlq_id)
                _, removed = await pipe.execute()
        return bool(removed)

    async def stats(self) -> QueueStats:
        with _redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                for stream in self.streams.values():
                    pipe.xlen(stream)
                pipe.xlen(self.dlq)
                pipe.get(self.shed_key)
                *depths, dlq, shed = await pipe.execute()
        return QueueStats(
            depth=dict(zip(PRIORITIES, (int(d) for d in depths), strict=True)),
            dead_letters=int(dlq), shed=int(shed or 0),
        )

    # --- for the outbox sweeper -----------------------------------------------------------

    async def oldest_queued_ms(self, priority: Priority) -> int | None:
        with _redis_errors():
            entries: Any = await self.redis.xrange(self.streams[priority], count=1)
        if not entries:
            return None
        return int(_text(entries[0][0]).partition("-")[0])  # entry ids start with Redis' ms

    async def try_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        with _redis_errors():
            taken = await self.redis.eval(
                _RENEW, 1, f"{self.prefix}:lease:{name}", holder, int(ttl_s * 1000))
        return bool(taken)

    async def prune_consumers(self, idle_s: float) -> int:
        removed = 0
        with _redis_errors():
            for stream in self.streams.values():
                consumers: Any = await self.redis.xinfo_consumers(stream, GROUP)
                for consumer in consumers:
                    if consumer["pending"] == 0 and consumer["idle"] > idle_s * 1000:
                        await self.redis.xgroup_delconsumer(stream, GROUP, consumer["name"])
                        removed += 1
        return removed


_letter_decoder = msgspec.msgpack.Decoder(DeadLetter)
