"""One contract for every Queue: Redis Streams and the embedded SQLite queue."""

from __future__ import annotations

import asyncio

import pytest

from feedsvc.model import BackfillTask, Envelope, Priority
from feedsvc.queue.redis import RedisQueue
from feedsvc.runtime import Runtime
from tests.conftest import MakeRuntime


def envelope(tag: str, enqueued_at: int) -> Envelope:
    return Envelope(BackfillTask([(tag, "x")]), enqueued_at)


def tag_of(env: Envelope) -> str:
    task = env.task
    assert isinstance(task, BackfillTask)
    return task.pairs[0][0]


async def test_priority_order_and_ack(runtime: Runtime) -> None:
    queue, now = runtime.queue, runtime.now_ms()
    order: list[tuple[Priority, str]] = [("low", "l1"), ("medium", "m1"), ("high", "h1"),
                                         ("low", "l2"), ("high", "h2")]
    for priority, tag in order:
        await queue.enqueue(priority, envelope(tag, now))
    assert (await queue.stats()).depth == {"high": 2, "medium": 1, "low": 2}
    got = []
    while (delivery := await queue.claim("c1", 0.05)) is not None:
        got.append(tag_of(delivery.envelope))
        await queue.ack(delivery)
    assert got == ["h1", "h2", "m1", "l1", "l2"]
    assert (await queue.stats()).depth == {"high": 0, "medium": 0, "low": 0}


async def test_unacked_entry_is_reclaimed_after_idle(make_runtime: MakeRuntime) -> None:
    rt = await make_runtime(claim_idle=0.5)
    await rt.queue.enqueue("medium", envelope("job", rt.now_ms()))
    first = await rt.queue.claim("dead-consumer", 0.05)
    assert first is not None
    assert await rt.queue.claim("live-consumer", 0.05) is None  # still owned, not idle yet
    await asyncio.sleep(0.8)
    again = await rt.queue.claim("live-consumer", 0.05)
    assert again is not None and tag_of(again.envelope) == "job"
    await rt.queue.ack(again)
    await asyncio.sleep(0.8)
    assert await rt.queue.claim("live-consumer", 0.05) is None


async def test_old_low_entries_are_shed_to_the_dead_letters(make_runtime: MakeRuntime) -> None:
    rt = await make_runtime(low_max_age=60.0)
    now = rt.now_ms()
    await rt.queue.enqueue("low", envelope("stale", now - 120_000))
    await rt.queue.enqueue("low", envelope("fresh", now))
    await rt.queue.enqueue("medium", envelope("old-but-medium", now - 120_000))
    got = []
    while (delivery := await rt.queue.claim("c", 0.05)) is not None:
        got.append(tag_of(delivery.envelope))
        await rt.queue.ack(delivery)
    assert got == ["old-but-medium", "fresh"]
    stats = await rt.queue.stats()
    assert stats.shed == 1 and stats.dead_letters == 1
    (letter,) = await rt.queue.dead_letters(10)
    assert letter.reason == "shed" and tag_of(letter.envelope) == "stale"


async def test_blocking_claim_wakes_on_enqueue(runtime: Runtime) -> None:
    waiter = asyncio.create_task(runtime.queue.claim("c", 5.0))
    await asyncio.sleep(0.2)
    await runtime.queue.enqueue("high", envelope("wake", runtime.now_ms()))
    delivery = await asyncio.wait_for(waiter, 5.0)
    assert delivery is not None and tag_of(delivery.envelope) == "wake"
    await runtime.queue.ack(delivery)


@pytest.mark.parametrize("make_runtime", ["cassandra"], indirect=True)
async def test_unreadable_redis_entry_goes_to_the_dead_letters(make_runtime: MakeRuntime) -> None:
    rt = await make_runtime()
    queue = rt.queue
    assert isinstance(queue, RedisQueue)
    await queue.redis.xadd(queue.streams["high"], {b"e": b"\xc1 not msgpack"})
    await queue.enqueue("high", envelope("good", rt.now_ms()))
    delivery = await queue.claim("c", 0.05)
    assert delivery is not None and tag_of(delivery.envelope) == "good"
    await queue.ack(delivery)
    stats = await queue.stats()
    assert stats.dead_letters == 1 and stats.depth["high"] == 0


@pytest.mark.parametrize("make_runtime", ["cassandra"], indirect=True)
async def test_sharded_streams_keep_priority_order_and_dead_letters(
        make_runtime: MakeRuntime) -> None:
    """FEEDSVC_QUEUE_SHARDS=3: a shard's streams share one hash tag (one cluster slot), tasks
    spread over the shards, and a consumer still takes high before medium before low."""
    rt = await make_runtime(queue_shards=3, low_max_age=60.0)
    queue = rt.queue
    assert isinstance(queue, RedisQueue)
    assert queue.streams["high"] == f"{rt.settings.queue_prefix}:{{q0}}:high"
    now = rt.now_ms()
    plan: list[tuple[Priority, str]] = [(p, f"{p}{i}") for i in range(12)
                                        for p in ("low", "medium", "high")]
    for priority, tag in plan:
        await queue.enqueue(priority, envelope(tag, now))
    await queue.enqueue("low", envelope("stale", now - 120_000))
    used = [await queue.redis.xlen(queue.stream_keys[shard, "fanout", "high"])
            for shard in range(3)]
    assert sum(used) == 12 and sum(1 for n in used if n) >= 2  # spread over the shards
    got = []
    while (delivery := await queue.claim("c", 0.05)) is not None:
        got.append(tag_of(delivery.envelope)[0])
        await queue.ack(delivery)
    assert got == ["h"] * 12 + ["m"] * 12 + ["l"] * 12
    (letter,) = await queue.dead_letters(10)
    assert letter.reason == "shed" and tag_of(letter.envelope) == "stale"
    assert letter.dlq_id.split(":")[0] in {"0", "1", "2"}
    assert await queue.dead_letters(10, before=letter.dlq_id) == []
    assert await queue.dead_letter_get("7:1-1") is None  # no such shard: not an error
    assert await queue.replay(letter.dlq_id)
    delivery = await queue.claim("c", 0.05)
    assert delivery is not None and tag_of(delivery.envelope) == "stale"
    await queue.ack(delivery)
    assert (await queue.stats()).depth == {"high": 0, "medium": 0, "low": 0}


async def test_channel_queues_are_served_apart(runtime: Runtime) -> None:
    queue, now = runtime.queue, runtime.now_ms()
    await queue.enqueue("low", envelope("fan", now))
    await queue.enqueue_many("push", "high", [envelope(f"p{i}", now) for i in range(3)])
    await queue.enqueue("medium", envelope("mail", now), queue="email")
    stats = await queue.stats()
    assert stats.queued == {"fanout": 1, "push": 3, "sms": 0, "email": 1}
    assert stats.depth == {"high": 0, "medium": 0, "low": 1}  # the fan-out queue's
    only_email = await queue.claim("c", 0.05, ("email",))
    assert only_email is not None and only_email.queue == "email"
    await queue.ack(only_email)
    got = []
    while (delivery := await queue.claim("c", 0.05, ("fanout", "push"))) is not None:
        got.append((delivery.queue, tag_of(delivery.envelope)))
        await queue.ack(delivery)
    assert got == [("push", "p0"), ("push", "p1"), ("push", "p2"), ("fanout", "fan")]


async def test_a_scheduled_entry_waits_for_its_time(runtime: Runtime) -> None:
    queue, now = runtime.queue, runtime.now_ms()
    await queue.schedule("sms", "high", envelope("later", now), now + 600)
    assert (await queue.stats()).scheduled == 1
    assert await queue.claim("c", 0.05, ("sms",)) is None
    await asyncio.sleep(0.7)
    await queue.move_due()
    delivery = await queue.claim("c", 0.5, ("sms",))
    assert delivery is not None and tag_of(delivery.envelope) == "later"
    assert delivery.queue == "sms"
    await queue.ack(delivery)
    stats = await queue.stats()
    assert (stats.scheduled, stats.queued["sms"]) == (0, 0)


async def test_send_once_claims_and_marks_a_tasks_targets_at_once(runtime: Runtime,
                                                                  prefix: str) -> None:
    """``claim_many`` / ``mark_sent_many``: one round trip for all of a task's targets,
    each key with the state a single ``claim`` would give it."""
    once = runtime.delivery.once
    keys = [f"{prefix}:push:{target}" for target in "abc"]
    assert await once.claim_many(keys, "w1", 30) == ["claimed"] * 3
    assert await once.claim_many(keys, "w1", 30) == ["claimed"] * 3  # retried by its holder
    await once.mark_sent_many(keys[:2])
    assert await once.claim_many([*keys, f"{prefix}:push:d"], "w2", 30) == [
        "sent", "sent", "busy", "claimed"]
    await once.release(keys[2], "w1")
    assert await once.claim_many(keys[2:], "w2", 30) == ["claimed"]
    assert await once.claim(keys[0], "w3", 30) == "sent"
    assert await once.claim_many([], "w2", 30) == []
    await once.mark_sent_many([])


async def test_nothing_is_before_the_first_possible_dead_letter(runtime: Runtime) -> None:
    """``GET /v1/dlq?cursor=0-0`` (found by ``make fuzz``): Redis refuses ``(0-0`` as a
    range bound, which made the page a 503; before the first possible id is nothing."""
    await runtime.queue.bury("push", "medium", envelope("dead", runtime.now_ms()), "test",
                             "buried")
    assert len(await runtime.queue.dead_letters(10)) == 1
    for cursor in ("0-0", "00-000", "0:0-0"):
        assert await runtime.queue.dead_letters(10, cursor) == []
