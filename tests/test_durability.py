"""A 202 is a promise: the outbox sweeper, workers that outlive their dependencies, and
dead-letter replay. Contract cases run on both backends; the Redis outage cases run a
private ``redis-server`` that the test kills with SIGKILL and starts again empty."""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import pytest

from feedsvc import intake
from feedsvc.errors import RetryableError
from feedsvc.model import PRIORITIES, Event, Priority
from feedsvc.queue.embedded import EmbeddedQueue
from feedsvc.queue.redis import RedisQueue
from feedsvc.runtime import Runtime, open_delivery, open_policy, open_runtime
from feedsvc.store.base import OutboxRow, outbox_bucket
from feedsvc.store.cassandra import CassandraStore
from feedsvc.store.recipients_cassandra import CassandraRecipients
from feedsvc.sweeper import QUEUE_CLOCK_SKEW_MS, Sweeper, decide
from feedsvc.workers import drain, run_workers
from tests.apiclient import Api
from tests.conftest import CassandraKeyspace, MakeApi, MakeClient, base_settings
from tests.servers import Endpoints, local_services

# --- the sweeper's decision (pure) --------------------------------------------------------


def _event(accepted_at: int, priority: Priority = "medium") -> Event:
    return Event(event_id="e", author_id="a", kind="k", created_at=accepted_at,
                 priority=priority, payload="{}", route="push", accepted_at=accepted_at,
                 body_hash="h")


def test_sweeper_decisions() -> None:
    t = 1_000_000_000_000
    bucket, grace, age = outbox_bucket(t), 30_000, 3_600_000
    empty: dict[Priority, int | None] = dict.fromkeys(PRIORITIES)
    row = OutboxRow("e", None, False)

    def verdict(row: OutboxRow, event: Event | None, now: int,
                oldest: dict[Priority, int | None] = empty, b: int = bucket) -> str:
        return decide(row, event, b, now, grace, oldest, age)

    assert verdict(OutboxRow("e", t, True), _event(t), t + 10 * grace) == "done"
    assert verdict(row, None, t + grace) == "settle"  # never stored: the client got a 503
    assert verdict(row, _event(t), t + grace, b=bucket + 1) == "settle"  # a retry's row
    assert verdict(row, _event(t), t + grace - 1) == "wait"
    assert verdict(row, _event(t), t + grace) == "requeue"
    queued_again = OutboxRow("e", t + 50_000, False)
    assert verdict(queued_again, _event(t), t + 60_000) == "wait"  # queued 10 s ago
    # An entry queued at or before this one is still in the stream: this one may be too.
    behind = {**empty, "medium": t + QUEUE_CLOCK_SKEW_MS}
    assert verdict(row, _event(t), t + grace, behind) == "wait"
    newer = {**empty, "medium": t + QUEUE_CLOCK_SKEW_MS + 1, "high": t - 5}
    assert verdict(row, _event(t), t + grace, newer) == "requeue"
    assert verdict(row, _event(t, "low"), t + age + 1) == "shed"
    assert verdict(row, _event(t, "low"), t + grace) == "requeue"


# --- helpers --------------------------------------------------------------------------------


async def lose_queue(rt: Runtime) -> None:
    """What a Redis that restarted without its data (or a failover to a replica that had
    not received the entries) leaves: every stream empty."""
    queue = rt.queue
    if isinstance(queue, RedisQueue):
        await queue.redis.delete(*queue.all_streams())
    else:
        assert isinstance(queue, EmbeddedQueue)
        await queue._run(queue.db.execute, "DELETE FROM entries")


async def graph(api: Api, followers: int = 5) -> tuple[str, list[str]]:
    """A push author and followers; the sweep checkpoint starts here, so a sweep reads only
    this test's outbox rows (the Cassandra keyspace is shared by the whole run)."""
    await api.rt.outbox.set_sweep_checkpoint(outbox_bucket(api.rt.now_ms()))
    author = api.user("author")
    fans = [api.user(f"fan{i}") for i in range(followers)]
    await api.bulk([(f, author) for f in fans])
    await api.drain()  # the (empty) backfills
    return author, fans


async def exactly_once(api: Api, users: list[str], events: list[str]) -> None:
    for user in [*users]:
        rows = await api.rows(user)
        assert sorted(rows) == sorted(events), user


async def owed(rt: Runtime, events: list[str], accepted_at: int) -> list[OutboxRow]:
    """The outbox rows of ``events`` still owing a fan-out (all accepted near
    ``accepted_at``, so within two buckets)."""
    rows: list[OutboxRow] = []
    for bucket in range(outbox_bucket(accepted_at) - 1, outbox_bucket(rt.now_ms()) + 1):
        rows += [r for r in await rt.outbox.outbox_bucket(bucket)
                 if r.event_id in events and not r.done]
    return rows


# --- the outbox, both backends ---------------------------------------------------------------


async def test_events_whose_queue_entries_were_lost_are_fanned_out_once(
        make_api: MakeApi) -> None:
    api = await make_api(sweep_after=0.3)
    author, fans = await graph(api)
    start = api.rt.now_ms()
    events = [await api.post_ok(author) for _ in range(12)]
    await lose_queue(api.rt)
    assert (await api.rt.queue.stats()).depth["medium"] == 0
    assert len(await owed(api.rt, events, start)) == 12
    sweeper = Sweeper(api.rt, "test")
    await asyncio.sleep(0.4)
    stats = await sweeper.sweep_once()
    assert stats.requeued >= 12  # (and any unsettled row of a test just before)
    assert (await sweeper.sweep_once()).requeued == 0  # queued again just now: it waits
    await api.drain()
    await exactly_once(api, [*fans, author], events)
    assert await owed(api.rt, events, start) == []
    await asyncio.sleep(0.4)
    assert (await sweeper.sweep_once()).requeued == 0


async def test_an_event_stored_by_a_request_that_died_is_fanned_out(
        make_api: MakeApi) -> None:
    """The API process killed between storing the event and queueing its task, and no
    client retry: the state that leaves is exactly what ``accept`` writes before
    ``publish``."""
    api = await make_api(sweep_after=0.3, celebrity_threshold=3)
    author, fans = await graph(api, followers=3)  # a pull author: readers pull its partition
    raw = msgspec.json.encode({"event_id": api.user("orphan"), "author_id": author,
                               "kind": "post", "payload": {"n": 1}})
    incoming, body_hash = intake.parse_body(raw)
    now = api.rt.now_ms()
    event = Event(event_id=incoming.event_id, author_id=author, kind="post", created_at=now,
                  priority="medium", payload='{"n":1}', route="pull", accepted_at=now,
                  body_hash=body_hash)
    await api.rt.outbox.record(event.event_id, now, 3600)
    assert await api.rt.store.insert_event(event, 3600) is None
    assert [i["event_id"] for i in await api.inbox(fans[0])] == []  # not visible yet
    await asyncio.sleep(0.4)
    assert (await Sweeper(api.rt, "test").sweep_once()).requeued == 1
    await api.drain()
    for fan in fans:  # pulled from the author's partition, which the worker wrote
        assert await api.inbox_ids(fan) == [event.event_id]
    assert await api.rows(author) == [event.event_id]


async def test_the_sweeper_leaves_an_entry_a_slow_worker_holds(make_api: MakeApi) -> None:
    api = await make_api(sweep_after=0.2)
    author, fans = await graph(api, followers=2)
    event_id = await api.post_ok(author)
    held = await api.rt.queue.claim("slow-but-alive", 0.1)
    assert held is not None
    await asyncio.sleep(0.3)
    stats = await Sweeper(api.rt, "test").sweep_once()
    assert (stats.requeued, stats.waiting) == (0, 1)
    assert (await api.rt.queue.stats()).depth["medium"] == 1
    from feedsvc.workers import process

    await process(api.rt, held)
    await exactly_once(api, fans, [event_id])
    assert (await api.rt.queue.stats()).depth["medium"] == 0


async def test_a_refused_insert_leaves_nothing_owed(make_api: MakeApi) -> None:
    """A row recorded for an event that was never stored (the insert failed and the client
    got a 503) is settled by the sweeper without queueing anything; so is the stray row a
    duplicate request records in its own bucket."""
    api = await make_api(sweep_after=0.2)
    author, fans = await graph(api, followers=1)
    now = api.rt.now_ms()
    await api.rt.outbox.record(api.user("never-stored"), now, 3600)
    event_id = await api.post_ok(author)
    await api.drain()
    status, _ = await api.post(author, event_id=event_id)  # same id, other payload
    assert status == 422
    await asyncio.sleep(0.3)
    stats = await Sweeper(api.rt, "test").sweep_once()
    assert stats.requeued == 0
    assert await owed(api.rt, [api.user("never-stored"), event_id], now) == []
    await exactly_once(api, fans, [event_id])


async def test_dead_letters_are_replayed(make_api: MakeApi) -> None:
    api = await make_api(low_max_age=0.2)
    author, fans = await graph(api, followers=2)
    stale = await api.post_ok(author, priority="low")
    await asyncio.sleep(0.3)
    await api.drain()
    assert await api.rows(fans[0]) == []
    (letter,) = await api.rt.queue.dead_letters(10)
    assert letter.reason == "shed" and letter.dlq_id
    assert await api.rt.queue.dead_letter_get(letter.dlq_id) == letter
    assert await api.rt.queue.replay(letter.dlq_id)
    assert not await api.rt.queue.replay(letter.dlq_id)  # gone from the dead letters
    assert await api.rt.queue.dead_letters(10) == []
    await api.drain()
    await exactly_once(api, fans, [stale])


# --- Redis killed (SIGKILL) and started again empty, Cassandra backend -------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PrivateRedis:
    """A ``redis-server`` of this test's own, without persistence: killed, it comes back
    empty, as a primary that lost its AOF's last second or a failover to a replica that
    never had the entries."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (make test installs it)", pytrace=False)
        self.binary, self.directory, self.port = binary, directory, _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.02)
        raise RuntimeError("the private redis-server did not start")

    def kill(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
            self.process = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
async def cassandra_runtime(
    endpoints: Endpoints, cassandra: CassandraKeyspace, cassandra_store: CassandraStore,
    cassandra_recipients: CassandraRecipients, private_redis: PrivateRedis, prefix: str,
) -> AsyncIterator[Runtime]:
    settings = base_settings(
        cassandra_hosts=endpoints.cassandra_hosts, redis_url=private_redis.url,
        keyspace=cassandra.keyspace, queue_prefix=prefix, sweep_after=0.5, claim_idle=1.0,
        request_timeout=2.0, celebrity_threshold=1_000)
    queue = await RedisQueue.open(private_redis.url, prefix=prefix, claim_idle=1.0,
                                  request_timeout=2.0)
    try:
        yield Runtime(settings, cassandra_store, queue,
                      recipients=cassandra_recipients,
                      delivery=await open_delivery(cassandra_store, queue),
                      policy=await open_policy(cassandra_store))
    finally:
        await queue.close()


async def wait_delivered(api: Api, users: list[str], events: list[str], seconds: float
                         ) -> None:
    """Until every user has at least ``len(events)`` rows (then ``exactly_once`` checks)."""
    deadline = time.monotonic() + seconds

    async def delivered() -> bool:
        try:
            return all([len(await api.rows(u)) >= len(events) for u in users])
        except RetryableError:  # a node still catching up after the fault: poll again
            return False

    while not await delivered():
        if time.monotonic() > deadline:
            missing = {u: sorted(set(events) - set(await api.rows(u))) for u in users[:3]}
            raise AssertionError(f"not delivered within {seconds} s: {missing}; owed "
                                 f"{await owed(api.rt, events, api.rt.now_ms() - 300_000)}")
        await asyncio.sleep(0.2)


@pytest.mark.slow
async def test_redis_killed_mid_stream_loses_nothing_and_workers_carry_on(
    cassandra_runtime: Runtime, private_redis: PrivateRedis, make_client: MakeClient,
    prefix: str,
) -> None:
    rt = cassandra_runtime
    api = Api(await make_client(rt), rt, prefix)
    author, fans = await graph(api, followers=40)
    stop = asyncio.Event()
    workers = asyncio.create_task(run_workers(rt, 4, stop))
    try:
        events = [await api.post_ok(author) for _ in range(30)]
        private_redis.kill()  # entries still queued are gone for good
        for _ in range(10):  # accepted while Redis is down: stored, left to the sweeper
            events.append(await api.post_ok(author))
        ready = await api.client.get("/readyz")
        assert ready.status == 503
        await asyncio.sleep(1.0)  # consumers meet the outage
        private_redis.start()
        await wait_delivered(api, [*fans, author], events, 60)
        assert not workers.done(), "the workers ended on the Redis outage"
        await exactly_once(api, [*fans, author], events)
        assert (await api.client.get("/readyz")).status == 200
    finally:
        stop.set()
        await asyncio.wait_for(workers, timeout=30)


async def test_intake_answers_202_while_redis_is_down(
    cassandra_runtime: Runtime, private_redis: PrivateRedis, make_client: MakeClient,
    prefix: str,
) -> None:
    rt = cassandra_runtime
    api = Api(await make_client(rt), rt, prefix)
    author, fans = await graph(api, followers=3)
    private_redis.kill()
    started = time.monotonic()
    event_id = await api.post_ok(author)
    assert time.monotonic() - started < 5  # a refused connection fails at once
    status, body = await api.post(author, event_id=event_id, payload={"n": api._seq})
    assert (status, body["status"]) == (200, "duplicate")  # a client retry changes nothing
    private_redis.start()
    await asyncio.sleep(0.6)
    # A new Redis has no group yet: the sweeper's pass and the consumers create it.
    assert (await Sweeper(rt, "test").sweep_once()).requeued == 1
    await drain(rt)
    await exactly_once(api, [*fans, author], [event_id])



# --- Cassandra paused (SIGSTOP), the local node -------------------------------------------


@pytest.mark.slow
async def test_a_paused_cassandra_is_waited_out(
    endpoints: Endpoints, cassandra: CassandraKeyspace, make_client: MakeClient, prefix: str,
    tmp_path: Path,
) -> None:
    """Cassandra stops answering (SIGSTOP) mid fan-out: the API answers 503 with Retry-After
    within the request timeout instead of hanging, the workers keep their entries and wait,
    and once the node answers again every accepted event reaches every follower once."""
    settings = base_settings(
        cassandra_hosts=endpoints.cassandra_hosts, redis_url=endpoints.redis_url,
        redis_cluster=endpoints.redis_cluster, keyspace=cassandra.keyspace,
        queue_prefix=prefix, request_timeout=1.0, celebrity_threshold=1_000, claim_idle=2.0)
    async with open_runtime(settings) as rt:
        api = Api(await make_client(rt), rt, prefix)
        author, fans = await graph(api, followers=300)
        events = [await api.post_ok(author) for _ in range(20)]
        stop = asyncio.Event()
        workers = asyncio.create_task(run_workers(rt, 4, stop))
        try:
            await asyncio.sleep(0.2)  # fan-outs under way
            await asyncio.to_thread(local_services, endpoints, "pause", "cassandra")
            try:
                started = time.monotonic()
                status, body = await api.post(author)
                waited = time.monotonic() - started
                assert status == 503 and body["error"]["code"] == "unavailable"
                assert waited < 5, waited  # the request timeout, not the driver's 30 s
                await asyncio.sleep(4.0)
            finally:
                await asyncio.to_thread(local_services, endpoints, "resume", "cassandra")
            await wait_delivered(api, [*fans, author], events, 90)
            assert not workers.done(), "the workers ended on the Cassandra outage"
            await exactly_once(api, [*fans, author], events)
        finally:
            stop.set()
            await asyncio.wait_for(workers, timeout=30)
            await api.client.close()  # the app stops before its runtime closes, as in serve
