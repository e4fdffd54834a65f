"""Redis Streams queue: streams per priority, one consumer group, XACK+XDEL on ack.

Key names (all of them, under one prefix, default ``feedsvc``), with one shard
(``FEEDSVC_QUEUE_SHARDS=1``) on a single Redis:

- ``{prefix}:q:high``, ``{prefix}:q:medium``, ``{prefix}:q:low``: the priority streams
  (field ``e`` = msgpack Envelope). Acknowledged entries are deleted, so XLEN is the depth.
- ``{prefix}:dlq``: the dead-letter stream (reason ``shed``, ``poison``).

With several shards, or on Redis Cluster (``FEEDSVC_REDIS_CLUSTER=true``), each shard ``n``
has its own three streams and dead-letter stream under one hash tag, so that they live in
one slot (a shard's transactions and blocking reads span its keys) while the shards spread
over the cluster: ``{prefix}:{qn}:high``, ``...:medium``, ``...:low``, ``{prefix}:{qn}:dlq``.
A task goes to a random shard; a consumer reads high on every shard before medium on any,
starting at a shard of its own, and blocks on its home shard's streams.

Also: ``{prefix}:stats:shed`` (how many low entries were shed), ``{prefix}:lease:{name}``
(leases, ``SET NX PX``, e.g. the outbox sweeper's) and ``{prefix}:processes`` (a hash: each
running process's latest report, for the status page).

Consumer group ``fanout``. A consumer first reclaims entries idle for ``claim_idle`` seconds
(XAUTOCLAIM: their consumer died), then reads new entries in priority order; when all are
empty it blocks on its home shard's streams.

Every Redis error becomes ``RetryableError`` in one place (``redis_errors``). The client
fails fast: a request unanswered within ``request_timeout`` fails, a broken connection is
retried once, and pooled connections are health-checked, so a restarted Redis is used
again at once. A Redis that lost its data has its consumer groups created again.
"""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from itertools import count
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import msgspec
import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from feedsvc import metrics
from feedsvc.clock import now_ms
from feedsvc.errors import RetryableError
from feedsvc.model import PRIORITIES, Envelope, Priority, decode_envelope, encode_envelope
from feedsvc.queue.base import (
    FANOUT,
    QUEUES,
    DeadLetter,
    Delivery,
    QueueName,
    QueueStats,
    StreamStats,
)

GROUP = "fanout"
MAX_CONNECTIONS = 256  # per process: each consumer holds one while it blocks on a read
_FIELD = b"e"
_RAW = b"raw"
MOVE_EVERY_S = 0.25  # how often a process moves due scheduled entries to their streams
# Moves up to ARGV[2] members of the schedule KEYS[1] due at ARGV[1] (epoch ms) to their
# streams; a member is "<stream key>|<entry>", the stream in the schedule's slot.
_MOVE_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, member in ipairs(due) do
  local cut = string.find(member, '|', 1, true)
  redis.call('XADD', string.sub(member, 1, cut - 1), '*', 'e', string.sub(member, cut + 1))
  redis.call('ZREM', KEYS[1], member)
end
return #due
"""
# Removes dead letter ARGV[1] from KEYS[1] and, only if it was there, queues ARGV[2] on
# the stream KEYS[2].
_REPLAY = """
if redis.call('XDEL', KEYS[1], ARGV[1]) == 1 then
  redis.call('XADD', KEYS[2], '*', 'e', ARGV[2])
  return 1
end
return 0
"""
REPORTS_KEPT_MS = 3_600_000  # a process silent this long is forgotten
_DLQ_ID = re.compile(r"^(?:([0-9]{1,4}):)?([0-9]{1,18}-[0-9]{1,18})$")
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
def redis_errors() -> Iterator[None]:
    """The adapter's one exception map: Redis is (briefly) unavailable -> RetryableError."""
    try:
        yield
    except (RedisError, RedisClusterException) as exc:  # the second: no reachable node
        raise RetryableError(f"redis: {exc}") from exc
    except (RuntimeError, AttributeError) as exc:
        # A connection that dies under a command does not always surface as a RedisError:
        # uvloop refuses a write on a socket the peer closed with RuntimeError ("... the
        # handler is closed"), and the cluster client can drop a connection another command
        # is writing on (its writer is None: AttributeError). Both seen when a primary was
        # SIGKILLed. redis-py has dropped that connection, so the next call reconnects.
        if not _raised_in_client(exc):
            raise  # our own bug, not the connection's
        raise RetryableError(f"redis: connection lost ({exc!r})") from exc


_CLIENT_DIR = os.path.dirname(redis.__file__) + os.sep


def _raised_in_client(exc: BaseException) -> bool:
    """Whether ``exc`` came up through redis-py's own code."""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.startswith(_CLIENT_DIR):
            return True
        tb = tb.tb_next
    return False


def cluster_nodes(url: str) -> tuple[str, list[tuple[str, int]]]:
    """A Redis Cluster URL may name several startup nodes, ``redis://h1:p1,h2:p2/0``: the
    client then starts (and later re-discovers the topology) from any that answers, where a
    single node that died left it dialing that node alone. Returns the URL with the first
    node only (for the other options it carries) and every node."""
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    nodes = []
    for item in hosts.split(","):
        host, _, port = item.strip().rpartition(":")
        nodes.append((host or item.strip(), int(port) if host and port else 6379))
    first = f"{userinfo}@{hosts.split(',')[0]}" if userinfo else hosts.split(",")[0]
    return urlunsplit(parts._replace(netloc=first)), nodes


def cluster_client(url: str, **options: Any) -> RedisCluster:
    """A Redis Cluster client started from every node ``url`` names."""
    first, nodes = cluster_nodes(url)
    if len(nodes) > 1:
        options["startup_nodes"] = [ClusterNode(host, port) for host, port in nodes]
    return RedisCluster.from_url(first, **options)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entry_order(dlq_id: str) -> tuple[int, int]:
    """A stream entry id ("<ms>-<seq>", after any "<shard>:") as a sortable pair."""
    ms, _, seq = dlq_id.rpartition(":")[2].partition("-")
    return int(ms), int(seq)


def _no_group(exc: ResponseError) -> bool:
    return "NOGROUP" in str(exc)


@metrics.instrumented("redis")
class RedisQueue:
    """``Queue`` on Redis Streams; see the module docstring."""

    def __init__(self, client: Any, *, prefix: str = "feedsvc", claim_idle: float = 60.0,
                 low_max_age: float = 3600.0, shards: int = 1, cluster: bool = False) -> None:
        self.redis = client  # redis.asyncio.Redis, or RedisCluster
        self.prefix = prefix
        self.claim_idle_ms = int(claim_idle * 1000)
        self.low_max_age_ms = int(low_max_age * 1000)
        self.shards = shards
        self.tagged = cluster or shards > 1
        self.stream_keys = {(shard, q, p): self._stream(shard, q, p)
                            for shard in range(shards) for q in QUEUES for p in PRIORITIES}
        self.dlq_keys = [self._key(shard, "dlq") for shard in range(shards)]
        self.scheduled_keys = [self._key(shard, "scheduled") for shard in range(shards)]
        self.streams = {p: self.stream_keys[0, "fanout", p] for p in PRIORITIES}  # shard 0's
        self.shed_key = f"{prefix}:stats:shed"
        self.reports_key = f"{prefix}:processes"
        self._by_key = {key: sqp for sqp, key in self.stream_keys.items()}
        self._last_move = 0.0
        self._buffer: dict[str, list[Delivery]] = {}
        self._last_reclaim: dict[str, float] = {}
        self._home: dict[str, int] = {}
        self._next_home = count()

    def _key(self, shard: int, name: str) -> str:
        """A shard's dead-letter stream or schedule."""
        return f"{self.prefix}:{{q{shard}}}:{name}" if self.tagged else f"{self.prefix}:{name}"

    def _stream(self, shard: int, queue: QueueName, priority: Priority) -> str:
        """A stream's key; the fan-out queue keeps the names it had before the channel
        queues (``{prefix}:q:high``)."""
        name = priority if queue == "fanout" else f"{queue}:{priority}"
        return f"{self.prefix}:{{q{shard}}}:{name}" if self.tagged else f"{self.prefix}:q:{name}"

    @classmethod
    async def open(cls, url: str, *, request_timeout: float = 5.0, cluster: bool = False,
                   **kwargs: Any) -> RedisQueue:
        options: dict[str, Any] = {
            "socket_connect_timeout": min(2.0, request_timeout),
            # Above the longest blocking read (``claim``'s block_s, a second or two).
            "socket_timeout": max(request_timeout, 3.0),
            "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=1),
            "health_check_interval": 5,
        }
        client: Any
        if cluster:
            client = cluster_client(url, **options)
        else:
            # A blocking pool: past MAX_CONNECTIONS a request waits for a free connection
            # (up to request_timeout) instead of failing with "Too many connections" at
            # once, which under a burst of posts left their fan-out to the sweeper.
            pool = aioredis.BlockingConnectionPool.from_url(
                url, max_connections=MAX_CONNECTIONS, timeout=request_timeout, **options)
            client = aioredis.Redis.from_pool(pool)  # closes the pool with the client
        queue = cls(client, cluster=cluster, **kwargs)
        try:
            await queue._create_groups()
        except RetryableError as exc:
            await client.aclose()
            raise RetryableError(f"cannot reach Redis: {exc}") from exc
        return queue

    def all_streams(self) -> list[str]:
        return list(self.stream_keys.values())

    async def _create_groups(self) -> None:
        """The consumer group on every stream (again after a Redis that lost its data)."""
        with redis_errors():
            for stream in self.stream_keys.values():
                try:
                    await self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
                except ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise

    async def ping(self) -> None:
        with redis_errors():
            await self.redis.ping()

    async def close(self) -> None:
        await self.redis.aclose()

    async def enqueue(self, priority: Priority, envelope: Envelope,
                      queue: QueueName = "fanout") -> str:
        shard = random.randrange(self.shards)
        with redis_errors():
            entry_id = await self.redis.xadd(
                self.stream_keys[shard, queue, priority], {_FIELD: encode_envelope(envelope)}
            )
        return _text(entry_id)

    async def enqueue_many(self, queue: QueueName, priority: Priority,
                           envelopes: Sequence[Envelope]) -> None:
        if not envelopes:
            return
        with redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                for envelope in envelopes:
                    shard = random.randrange(self.shards)
                    pipe.xadd(self.stream_keys[shard, queue, priority],
                              {_FIELD: encode_envelope(envelope)})
                await pipe.execute()

    async def schedule(self, queue: QueueName, priority: Priority, envelope: Envelope,
                       due_ms: int) -> None:
        shard = random.randrange(self.shards)
        member = self.stream_keys[shard, queue, priority].encode() + b"|" + encode_envelope(
            envelope)
        with redis_errors():
            await self.redis.zadd(self.scheduled_keys[shard], {member: due_ms})

    async def move_due(self, now: int | None = None) -> int:
        """Move the scheduled entries whose time has come to their streams (each shard's
        schedule and streams share a slot, so one script does it atomically)."""
        moved = 0
        with redis_errors():
            for key in self.scheduled_keys:
                moved += int(await self.redis.eval(_MOVE_DUE, 1, key,
                                                   now if now is not None else now_ms(), 256))
        return moved

    async def _deliveries(self, stream: str, entries: list[Any]) -> list[Delivery]:
        shard, queue, priority = self._by_key[stream]
        out = []
        for entry_id, fields in entries:
            if not fields:  # deleted while pending
                continue
            eid = _text(entry_id)
            try:
                out.append(Delivery(priority, eid, decode_envelope(fields[_FIELD]), shard,
                                    queue))
            except (KeyError, msgspec.DecodeError) as exc:
                await self._dead_letter_raw(stream, shard, priority, eid, fields, repr(exc))
        return out

    async def _dead_letter_raw(self, stream: str, shard: int, priority: Priority,
                               entry_id: str, fields: dict[bytes, bytes], detail: str) -> None:
        """An entry no version of the code can read (say, after an incompatible deploy):
        kept as it is in the dead-letter stream with reason ``poison``, then removed."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.dlq_keys[shard], {_RAW: msgspec.msgpack.encode(
                {"entry_id": entry_id, "priority": priority, "reason": "poison",
                 "detail": detail[:1000], "fields": fields})})
            pipe.xack(stream, GROUP, entry_id)
            pipe.xdel(stream, entry_id)
            await pipe.execute()
        metrics.dead_lettered(self._by_key[stream][1], "poison")

    async def claim(self, consumer: str, block_s: float,
                    queues: Sequence[QueueName] = FANOUT) -> Delivery | None:
        with redis_errors():
            try:
                return await self._claim(consumer, block_s, queues)
            except ResponseError as exc:
                if not _no_group(exc):
                    raise
                # Redis came back without its data (no persistence, a failover to a replica
                # that never had the stream): make the group again; lost entries are the
                # outbox sweeper's to queue again.
                await self._create_groups()
                return await self._claim(consumer, block_s, queues)

    async def _claim(self, consumer: str, block_s: float,
                     queues: Sequence[QueueName]) -> Delivery | None:
        buffer = self._buffer.setdefault(consumer, [])
        deadline = time.monotonic() + block_s
        while True:
            read_any = True
            while not buffer and read_any:  # unreadable entries are dead-lettered: read on
                read_any = await self._fill(consumer, queues, buffer,
                                            deadline - time.monotonic())
            if not buffer:
                return None
            buffer.sort(key=lambda d: PRIORITIES.index(d.priority))
            delivery = buffer.pop(0)
            if not self._expired(delivery):
                return delivery
            await self.shed(delivery)

    def _shard_order(self, consumer: str) -> list[int]:
        """Every shard, starting at the consumer's home shard (consumers of a process get
        homes in turn, so each shard has a consumer blocking on it)."""
        home = self._home.get(consumer)
        if home is None:
            home = self._home[consumer] = next(self._next_home) % self.shards
        return [(home + i) % self.shards for i in range(self.shards)]

    async def _fill(self, consumer: str, queues: Sequence[QueueName], buffer: list[Delivery],
                    block_s: float) -> bool:
        """Move due scheduled entries (a few times a second per process), reclaim idle
        entries of dead consumers, else read new entries by priority (high on every queue
        and shard before medium on any), else block on the home shard's streams of these
        queues for up to ``block_s``. True when any entry was read."""
        shards = self._shard_order(consumer)
        now = time.monotonic()
        if now - self._last_move >= MOVE_EVERY_S:
            self._last_move = now
            await self.move_due()
        order = [(shard, queue, priority) for priority in PRIORITIES for queue in queues
                 for shard in shards]
        if now - self._last_reclaim.get(consumer, 0.0) >= self.claim_idle_ms / 2000:
            self._last_reclaim[consumer] = now
            for key in order:
                stream = self.stream_keys[key]
                reply: Any = await self.redis.xautoclaim(
                    stream, GROUP, consumer, min_idle_time=self.claim_idle_ms,
                    start_id="0-0", count=1,  # more would sit idle in this one's buffer
                )
                buffer.extend(await self._deliveries(stream, reply[1]))
            if buffer:
                return True
        for key in order:
            stream = self.stream_keys[key]
            read: Any = await self.redis.xreadgroup(GROUP, consumer, {stream: ">"}, count=1)
            if read:
                buffer.extend(await self._deliveries(stream, read[0][1]))
                return True
        if block_s > 0:
            home = {self.stream_keys[shards[0], q, p]: ">" for p in PRIORITIES for q in queues}
            blocked: Any = await self.redis.xreadgroup(
                GROUP, consumer, home, count=1,
                block=max(1, int(min(block_s, MOVE_EVERY_S * 4) * 1000)))
            for stream, entries in blocked or []:
                buffer.extend(await self._deliveries(_text(stream), entries))
            return bool(blocked)
        return False

    def _expired(self, delivery: Delivery) -> bool:
        return (delivery.priority == "low"
                and now_ms() - delivery.envelope.enqueued_at > self.low_max_age_ms)

    async def shed(self, delivery: Delivery) -> None:
        await self.redis.incr(self.shed_key)
        metrics.shed(delivery.queue, delivery.priority)
        await self._dead_letter(delivery, "shed", "older than FEEDSVC_LOW_MAX_AGE")

    async def ack(self, delivery: Delivery) -> None:
        stream = self.stream_keys[delivery.shard, delivery.queue, delivery.priority]
        with redis_errors():
            try:
                async with self.redis.pipeline(transaction=True) as pipe:
                    pipe.xack(stream, GROUP, delivery.entry_id)
                    pipe.xdel(stream, delivery.entry_id)
                    await pipe.execute()
            except ResponseError as exc:
                if not _no_group(exc):
                    raise
                # Redis lost the stream since the claim: the entry is gone already.

    async def touch(self, delivery: Delivery, consumer: str) -> None:
        stream = self.stream_keys[delivery.shard, delivery.queue, delivery.priority]
        with redis_errors():  # XCLAIM to itself, JUSTID: resets the idle time, nothing else
            await self.redis.xclaim(stream, GROUP, consumer, 0, [delivery.entry_id],
                                    justid=True)

    async def dead_letter(self, delivery: Delivery, reason: str, detail: str) -> None:
        with redis_errors():
            try:
                await self._dead_letter(delivery, reason, detail)
            except ResponseError as exc:
                if not _no_group(exc):
                    raise
                await self._create_groups()  # Redis lost the stream: record it again
                await self._dead_letter(delivery, reason, detail)

    async def _dead_letter(self, delivery: Delivery, reason: str, detail: str) -> None:
        """Record and acknowledge in one transaction: never both lost nor both kept."""
        record = DeadLetter(delivery.entry_id, delivery.priority, reason, detail[:1000],
                            now_ms(), delivery.envelope, queue=delivery.queue)
        stream = self.stream_keys[delivery.shard, delivery.queue, delivery.priority]
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.dlq_keys[delivery.shard], {_FIELD: msgspec.msgpack.encode(record)})
            pipe.xack(stream, GROUP, delivery.entry_id)
            pipe.xdel(stream, delivery.entry_id)
            await pipe.execute()
        metrics.dead_lettered(delivery.queue, reason)

    async def bury(self, queue: QueueName, priority: Priority, envelope: Envelope,
                   reason: str, detail: str) -> None:
        record = DeadLetter("", priority, reason, detail[:1000], now_ms(), envelope,
                            queue=queue)
        with redis_errors():
            await self.redis.xadd(self.dlq_keys[random.randrange(self.shards)],
                                  {_FIELD: msgspec.msgpack.encode(record)})
        metrics.dead_lettered(queue, reason)

    # --- dead letters ---------------------------------------------------------------------
    # A dead letter's id is its dead-letter stream entry id, prefixed with "<shard>:" when
    # the queue has shards.

    def _dlq_id(self, shard: int, entry_id: str) -> str:
        return f"{shard}:{entry_id}" if self.tagged else entry_id

    def _parse_dlq_id(self, dlq_id: str) -> tuple[int, str] | None:
        match = _DLQ_ID.match(dlq_id)
        if match is None:
            return None
        shard = int(match.group(1) or 0)
        return (shard, match.group(2)) if shard < self.shards else None

    def _letters(self, shard: int, entries: Any) -> list[DeadLetter]:
        """Decoded dead letters with their ids; raw (unreadable) entries are left out."""
        out = []
        for entry_id, fields in entries:
            if _FIELD in fields:
                letter = _letter_decoder.decode(fields[_FIELD])
                out.append(msgspec.structs.replace(
                    letter, dlq_id=self._dlq_id(shard, _text(entry_id))))
        return out

    async def dead_letters(self, limit: int, before: str | None = None) -> list[DeadLetter]:
        bound = "+"
        if before:
            parsed = self._parse_dlq_id(before)
            if parsed is None or set(parsed[1]) <= {"0", "-"}:
                return []  # nothing is before 0-0 (and Redis refuses "(0-0" as a bound)
            bound = f"({parsed[1]}"
        found: list[tuple[tuple[int, int], DeadLetter]] = []
        with redis_errors():
            for shard, key in enumerate(self.dlq_keys):
                entries: Any = await self.redis.xrevrange(key, max=bound, count=limit)
                found += [(_entry_order(letter.dlq_id), letter)
                          for letter in self._letters(shard, entries)]
        found.sort(key=lambda pair: pair[0], reverse=True)  # newest first across shards
        return [letter for _, letter in found[:limit]]

    async def dead_letter_get(self, dlq_id: str) -> DeadLetter | None:
        parsed = self._parse_dlq_id(dlq_id)
        if parsed is None:
            return None
        shard, entry_id = parsed
        with redis_errors():
            entries: Any = await self.redis.xrange(self.dlq_keys[shard], min=entry_id,
                                                   max=entry_id, count=1)
        letters = self._letters(shard, entries)
        return letters[0] if letters else None

    async def replay(self, dlq_id: str) -> bool:
        letter = await self.dead_letter_get(dlq_id)
        parsed = self._parse_dlq_id(dlq_id)
        if letter is None or parsed is None:
            return False
        shard, entry_id = parsed
        # A new entry with a new queued time: a low task is not shed again at once. It goes
        # back to its own shard, and only by the call that removed the dead letter (two
        # replays at once queue it once): one script, one slot.
        envelope = msgspec.structs.replace(letter.envelope, enqueued_at=now_ms())
        with redis_errors():
            moved = await self.redis.eval(
                _REPLAY, 2, self.dlq_keys[shard], self.stream_keys[shard, letter.queue,
                                                                   letter.priority],
                entry_id, encode_envelope(envelope))
        return bool(moved)

    async def stats(self) -> QueueStats:
        keys = list(self.stream_keys)
        with redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.xlen(self.stream_keys[key])
                for dlq in self.dlq_keys:
                    pipe.xlen(dlq)
                for scheduled in self.scheduled_keys:
                    pipe.zcard(scheduled)
                pipe.get(self.shed_key)
                replies = await pipe.execute()
        depth: dict[str, int] = dict.fromkeys(PRIORITIES, 0)
        queued: dict[str, int] = dict.fromkeys(QUEUES, 0)
        for (_, queue, priority), length in zip(keys, replies, strict=False):
            queued[queue] += int(length)
            if queue == "fanout":
                depth[priority] += int(length)
        rest: list[Any] = replies[len(keys):]
        return QueueStats(
            depth=depth, dead_letters=sum(int(n) for n in rest[:self.shards]),
            shed=int(rest[-1] or 0), queued=queued,
            scheduled=sum(int(n) for n in rest[self.shards:2 * self.shards]))

    async def stream_stats(self) -> list[StreamStats]:
        keys = list(self.stream_keys)
        with redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    stream = self.stream_keys[key]
                    pipe.xlen(stream)
                    pipe.xpending(stream, GROUP)
                    pipe.xrange(stream, count=1)
                # A stream Redis lost (no group yet) answers an error: it counts as empty.
                replies: list[Any] = await pipe.execute(raise_on_error=False)
        figures: dict[tuple[QueueName, Priority], list[Any]] = {
            (q, p): [0, 0, None] for q in QUEUES for p in PRIORITIES}
        for i, (_, queue, priority) in enumerate(keys):
            length, pending, first = replies[3 * i:3 * i + 3]
            figure = figures[queue, priority]
            figure[0] += length if isinstance(length, int) else 0
            figure[1] += int(pending.get("pending", 0)) if isinstance(pending, dict) else 0
            if isinstance(first, list) and first:  # entry ids start with Redis' clock in ms
                queued = int(_text(first[0][0]).partition("-")[0])
                figure[2] = queued if figure[2] is None else min(figure[2], queued)
        return [StreamStats(q, p, depth, pending, oldest)
                for (q, p), (depth, pending, oldest) in figures.items()]

    # --- process reports --------------------------------------------------------------------

    async def put_report(self, process_id: str, body: bytes) -> None:
        with redis_errors():
            await self.redis.hset(self.reports_key, process_id,
                                  now_ms().to_bytes(8, "big") + body)

    async def reports(self, within_s: float) -> list[tuple[int, bytes]]:
        now = now_ms()
        out: list[tuple[int, bytes]] = []
        old: list[Any] = []
        with redis_errors():
            every: Any = await self.redis.hgetall(self.reports_key)
            for name, value in every.items():
                stamp = int.from_bytes(value[:8], "big")
                if now - stamp > REPORTS_KEPT_MS:
                    old.append(name)
                elif now - stamp <= within_s * 1000:
                    out.append((stamp, bytes(value[8:])))
            if old:
                await self.redis.hdel(self.reports_key, *old)
        return out

    async def drop_report(self, process_id: str) -> None:
        with redis_errors():
            await self.redis.hdel(self.reports_key, process_id)

    # --- for the outbox sweeper -----------------------------------------------------------

    async def oldest_queued_ms(self, priority: Priority,
                               queue: QueueName = "fanout") -> int | None:
        oldest: int | None = None
        with redis_errors():
            for shard in range(self.shards):
                entries: Any = await self.redis.xrange(
                    self.stream_keys[shard, queue, priority], count=1)
                if entries:  # entry ids start with Redis' clock in ms
                    queued = int(_text(entries[0][0]).partition("-")[0])
                    oldest = queued if oldest is None else min(oldest, queued)
        return oldest

    async def try_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        with redis_errors():
            taken = await self.redis.eval(
                _RENEW, 1, f"{self.prefix}:lease:{name}", holder, int(ttl_s * 1000))
        return bool(taken)

    async def prune_consumers(self, idle_s: float) -> int:
        removed = 0
        with redis_errors():
            for stream in self.stream_keys.values():
                consumers: Any = await self.redis.xinfo_consumers(stream, GROUP)
                for consumer in consumers:
                    if consumer["pending"] == 0 and consumer["idle"] > idle_s * 1000:
                        await self.redis.xgroup_delconsumer(stream, GROUP, consumer["name"])
                        removed += 1
        return removed


_letter_decoder = msgspec.msgpack.Decoder(DeadLetter)
