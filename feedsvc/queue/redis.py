"""Redis Streams queue: one stream per priority, one consumer group, XACK+XDEL on ack.

Key names (all of them, under one prefix, default ``feedsvc``):

- ``{prefix}:q:high``, ``{prefix}:q:medium``, ``{prefix}:q:low``: the priority streams
  (field ``e`` = msgpack Envelope). Acknowledged entries are deleted, so XLEN is the depth.
- ``{prefix}:dlq``: the dead-letter stream (reason ``shed``, ``error``, ``poison``).
- ``{prefix}:stats:shed``: how many low entries were shed.

Consumer group ``fanout``. A consumer first reclaims entries idle for ``claim_idle`` seconds
(XAUTOCLAIM: their consumer died), then reads new entries stream by stream in priority
order; when all are empty it blocks on all three at once.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from feedsvc.clock import now_ms
from feedsvc.errors import RetryableError
from feedsvc.model import PRIORITIES, Envelope, Priority, decode_envelope, encode_envelope
from feedsvc.queue.base import DeadLetter, Delivery, QueueStats

GROUP = "fanout"
_FIELD = b"e"


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
    async def open(cls, url: str, **kwargs: Any) -> RedisQueue:
        client = aioredis.Redis.from_url(url)
        queue = cls(client, **kwargs)
        try:
            for stream in queue.streams.values():
                try:
                    await client.xgroup_create(stream, GROUP, id="0", mkstream=True)
                except ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise
        except RedisError as exc:
            await client.aclose()
            raise RetryableError(f"cannot reach Redis: {exc}") from exc
        return queue

    async def ping(self) -> None:
        try:
            await self.redis.ping()
        except RedisError as exc:
            raise RetryableError(f"redis: {exc}") from exc

    async def close(self) -> None:
        await self.redis.aclose()

    async def enqueue(self, priority: Priority, envelope: Envelope) -> str:
        try:
            entry_id = await self.redis.xadd(
                self.streams[priority], {_FIELD: encode_envelope(envelope)}
            )
        except RedisError as exc:
            raise RetryableError(f"redis: {exc}") from exc
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    async def _deliveries(self, priority: Priority, entries: list[Any]) -> list[Delivery]:
        out = []
        for entry_id, fields in entries:
            if not fields:  # deleted while pending
                continue
            eid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
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
            pipe.xadd(self.dlq, {b"raw": msgspec.msgpack.encode(
                {"entry_id": entry_id, "priority": priority, "reason": "poison",
                 "detail": detail[:1000], "fields": fields})})
            pipe.xack(stream, GROUP, entry_id)
            pipe.xdel(stream, entry_id)
            await pipe.execute()

    async def claim(self, consumer: str, block_s: float) -> Delivery | None:
        try:
            return await self._claim(consumer, block_s)
        except RedisError as exc:
            raise RetryableError(f"redis: {exc}") from exc

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
        await self.dead_letter(delivery, "shed", "older than FEEDSVC_LOW_MAX_AGE")

    async def ack(self, delivery: Delivery) -> None:
        stream = self.streams[delivery.priority]
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.xack(stream, GROUP, delivery.entry_id)
                pipe.xdel(stream, delivery.entry_id)
                await pipe.execute()
        except RedisError as exc:
            raise RetryableError(f"redis: {exc}") from exc

    async def dead_letter(self, delivery: Delivery, reason: str, detail: str) -> None:
        record = DeadLetter(delivery.entry_id, delivery.priority, reason, detail[:1000],
                            now_ms(), delivery.envelope)
        try:
            await self.redis.xadd(self.dlq, {_FIELD: msgspec.msgpack.encode(record)})
        except RedisError as exc:
            raise RetryableError(f"redis: {exc}") from exc
        await self.ack(delivery)

    async def dead_letters(self, limit: int) -> list[DeadLetter]:
        try:
            entries: Any = await self.redis.xrevrange(self.dlq, count=limit)
        except RedisError as exc:
            raise RetryableError(f"redis: {exc}") from exc
        decoder = msgspec.msgpack.Decoder(DeadLetter)
        return [decoder.decode(fields[_FIELD]) for _, fields in entries if _FIELD in fields]

    async def stats(self) -> QueueStats:
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for stream in self.streams.values():
                    pipe.xlen(stream)
                pipe.xlen(self.dlq)
                pipe.get(self.shed_key)
                *depths, dlq, shed = await pipe.execute()
        except RedisError as exc:
            raise RetryableError(f"redis: {exc}") from exc
        return QueueStats(
            depth=dict(zip(PRIORITIES, (int(d) for d in depths), strict=True)),
            dead_letters=int(dlq), shed=int(shed or 0),
        )
