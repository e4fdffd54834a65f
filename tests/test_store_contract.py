"""One contract for every Store: run against Cassandra and the embedded SQLite store."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import pytest
from cassandra.protocol import ErrorMessage

from feedsvc.clock import now_ms
from feedsvc.delivery.state import DeliveryRecord
from feedsvc.errors import ConfigError, RetryableError
from feedsvc.model import Event, InboxItem, Position
from feedsvc.runtime import Runtime
from feedsvc.store import cassandra as cassandra_module
from feedsvc.store.base import OUTBOX_BUCKET_MS, OutboxRow, outbox_bucket
from feedsvc.store.cassandra import CassandraStore
from feedsvc.store.policy import SentRef
from tests.conftest import CassandraKeyspace, MakeRuntime
from tests.servers import Endpoints, local_nodetool

DAY_MS = 86_400_000


def item(author: str, t: int, e: str, *, direct: bool = False,
         object_id: str | None = None) -> InboxItem:
    return InboxItem(event_id=e, author_id=author, kind="post", created_at=t,
                     priority="medium", payload='{"n":1}', object_id=object_id, direct=direct)


def event(e: str, body_hash: str = "h1") -> Event:
    return Event(event_id=e, author_id="a", kind="k", created_at=1, priority="medium",
                 payload="{}", route="push", accepted_at=1, body_hash=body_hash)


async def test_insert_event_once(runtime: Runtime, prefix: str) -> None:
    store = runtime.store
    first = event(f"{prefix}-e1")
    assert await store.insert_event(first, 3600) is None
    again = await store.insert_event(event(f"{prefix}-e1", "other"), 3600)
    assert again == first  # the stored one, not overwritten
    assert await store.get_event(first.event_id) == first
    racers = [event(f"{prefix}-race", f"h{i}") for i in range(8)]
    results = await asyncio.gather(*(store.insert_event(r, 3600) for r in racers))
    assert sum(r is None for r in results) == 1


async def test_outbox_rows_and_checkpoint(runtime: Runtime, prefix: str) -> None:
    outbox, now = runtime.outbox, runtime.now_ms()
    bucket = outbox_bucket(now)
    start = bucket * OUTBOX_BUCKET_MS  # three events in one bucket
    ids = [f"{prefix}-o{i}" for i in range(3)]
    for i, event_id in enumerate(ids):
        await outbox.record(event_id, start + i, 3600)
    assert await outbox.outbox_row(ids[0], start) == OutboxRow(ids[0], None, False)
    await outbox.mark_queued(ids[0], start, now, 3600)
    await outbox.settle(ids[1], start + 1, 3600)
    await outbox.record(ids[1], start + 1, 3600)  # a late retry does not undo settle
    await outbox.mark_queued(ids[1], start + 1, now + 5, 3600)  # nor does a late queue
    rows = {r.event_id: r for r in await outbox.outbox_bucket(bucket)
            if r.event_id.startswith(prefix)}
    assert rows == {ids[0]: OutboxRow(ids[0], now, False),
                    ids[1]: OutboxRow(ids[1], now + 5, True),
                    ids[2]: OutboxRow(ids[2], None, False)}
    assert await outbox.outbox_row(ids[2], start - OUTBOX_BUCKET_MS) is None  # other bucket
    await outbox.set_sweep_checkpoint(bucket - 3)
    assert await outbox.sweep_checkpoint() == bucket - 3
    await outbox.set_sweep_checkpoint(bucket)
    assert await outbox.sweep_checkpoint() == bucket


async def test_inbox_order_paging_and_upsert(runtime: Runtime, prefix: str) -> None:
    store, user = runtime.store, f"{prefix}-u"
    now = runtime.now_ms()
    items = [item("a", now - i * 1000, f"e{i:02d}") for i in range(30)]
    items.append(item("a", now - 5000, "e05b"))  # same created_at as e05: event_id breaks ties
    for it in items:
        await store.write_inbox([user], it, 3600)
        await store.write_inbox([user], it, 3600)  # a retry rewrites the same row
    got: list[InboxItem] = []
    position: Position | None = None
    while True:
        page = await store.read_inbox(user, position, 7)
        got += page
        if len(page) < 7:
            break
        position = Position(page[-1].created_at, page[-1].event_id)
    expected = sorted(items, key=lambda i: (i.created_at, i.event_id), reverse=True)
    assert [i.event_id for i in got] == [i.event_id for i in expected]


async def test_delete_author_rows_keeps_direct_and_others(runtime: Runtime, prefix: str) -> None:
    store, user = runtime.store, f"{prefix}-u"
    now = runtime.now_ms()
    await store.write_inbox([user], item("gone", now - 1, "x1"), 3600)
    await store.write_inbox([user], item("gone", now - 2, "x2"), 3600)
    await store.write_inbox([user], item("gone", now - 3, "x3", direct=True), 3600)
    await store.write_inbox([user], item("stays", now - 4, "y1"), 3600)
    assert await store.delete_inbox_author(user, "gone") == 2
    assert [i.event_id for i in await store.read_inbox(user, None, 10)] == ["x3", "y1"]


async def test_trim_keeps_the_newest(runtime: Runtime, prefix: str) -> None:
    store, user = runtime.store, f"{prefix}-u"
    now = runtime.now_ms()
    for i in range(25):
        await store.write_inbox([user], item("a", now - i, f"e{i:02d}"), 3600)
    await store.trim_inbox(user, 10)
    rows = await store.read_inbox(user, None, 100)
    assert [r.event_id for r in rows] == [f"e{i:02d}" for i in range(10)]
    await store.trim_inbox(user, 10)  # nothing more to trim
    assert len(await store.read_inbox(user, None, 100)) == 10


async def test_follow_graph_counts_and_pages(runtime: Runtime, prefix: str) -> None:
    store, author = runtime.store, f"{prefix}-star"
    fans = [f"{prefix}-f{i:04d}" for i in range(2345)]
    results = await asyncio.gather(*(store.follow(f, author) for f in fans))
    assert all(results)
    assert not await store.follow(fans[0], author)  # idempotent: counts change once
    assert await store.counts(author) == (2345, 0)
    assert await store.counts(fans[0]) == (0, 1)
    seen: list[str] = []
    after: str | None = None
    while True:
        page, after = await store.followers_page(author, after, 1000)
        assert len(page) <= 1000
        seen += page
        if after is None:
            break
    assert sorted(seen) == fans
    pages = [page async for page in store.follower_pages(author, 100)]
    assert [len(page) for page in pages] == [100] * 23 + [45]  # full pages, then the rest
    for size, lengths in ((469, [469] * 5), (5_000, [2345])):  # an exact multiple; one page
        assert [len(page) async for page in store.follower_pages(author, size)] == lengths
    assert [page async for page in store.follower_pages(f"{prefix}-nobody", 100)] == []
    assert sorted(f for page in pages for f in page) == fans
    assert await store.unfollow(fans[0], author)
    assert not await store.unfollow(fans[0], author)
    assert await store.counts(author) == (2344, 0)
    assert await store.following_subset(fans[1], [author, "nobody"]) == {author}
    assert await store.following_subset(fans[0], [author]) == set()
    following, more = await store.following_page(fans[1], None, 10)
    assert (following, more) == ([author], None)


async def test_author_events_span_buckets(runtime: Runtime, prefix: str) -> None:
    store, author = runtime.store, f"{prefix}-a"
    now = runtime.now_ms()
    times = [now - d * DAY_MS - i for d in range(5) for i in range(3)]
    for n, t in enumerate(times):
        await store.put_author_event(item(author, t, f"e{n:02d}"), 3600)
    since = now - 3 * DAY_MS - 10  # the oldest bucket's events fall outside
    got = await store.author_events(author, None, 100, since)
    assert [i.created_at for i in got] == sorted((t for t in times if t >= since), reverse=True)
    middle = got[4]
    older = await store.author_events(author, Position(middle.created_at, middle.event_id),
                                      3, since)
    assert older == got[5:8]


async def test_pull_authors_and_modes(make_runtime: MakeRuntime, prefix: str) -> None:
    rt = await make_runtime()
    store = rt.store
    await store.touch_pull_author(f"{prefix}-celeb", 3600)
    assert f"{prefix}-celeb" in await store.pull_authors()
    assert await store.get_mode(f"{prefix}-x") == "push"
    await store.set_mode(f"{prefix}-x", "pull")
    assert await store.get_mode(f"{prefix}-x") == "pull"


async def test_rows_expire(runtime: Runtime, prefix: str) -> None:
    store, user = runtime.store, f"{prefix}-u"
    now = runtime.now_ms()
    await store.write_inbox([user], item("a", now, "short"), 1)
    await store.write_inbox([user], item("a", now - 1, "long"), 3600)
    await store.put_author_event(item(f"{prefix}-a", now, "short"), 1)
    assert len(await store.read_inbox(user, None, 10)) == 2
    await asyncio.sleep(2.2)
    assert [i.event_id for i in await store.read_inbox(user, None, 10)] == ["long"]
    assert await store.author_events(f"{prefix}-a", None, 10, 0) == []


async def test_large_items_fan_out_completely(runtime: Runtime, prefix: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Items near the 4 KiB payload limit; on Cassandra the batch-size estimate is also
    disabled so the server refuses oversized batches and the store must split them."""
    from feedsvc.store import cassandra as cassandra_store

    monkeypatch.setattr(cassandra_store, "BATCH_BYTES", 10**9)
    users = [f"{prefix}-u{i:03d}" for i in range(300)]
    big = InboxItem(event_id="big", author_id="a", kind="post", created_at=runtime.now_ms(),
                    priority="medium", payload='{"x":"' + "y" * 4000 + '"}')
    await runtime.store.write_inbox(users, big, 3600)
    rows = await asyncio.gather(*(runtime.store.read_inbox(u, None, 5) for u in users))
    assert all([r.event_id for r in inbox] == ["big"] for inbox in rows)


@pytest.mark.parametrize("payload_chars", [10, 100, 1_000, 4_000])
async def test_cassandra_batches_sized_under_the_server_limit(
        cassandra_store: CassandraStore, prefix: str, monkeypatch: pytest.MonkeyPatch,
        payload_chars: int) -> None:
    """The batch-size estimate must never be below what Cassandra counts: no batch of a
    fan-out may be refused (a refusal shows as rows sent twice, once in the refused batch and
    again in its halves), and small items still travel many rows per batch."""
    sent: list[int] = []
    send = cassandra_store._send_rows

    async def counting(rows: Sequence[str], shared: tuple[bytes, ...]) -> None:
        sent.append(len(rows))
        await send(rows, shared)

    monkeypatch.setattr(cassandra_store, "_send_rows", counting)
    users = [f"{prefix}-{'u' * 40}{i:04d}" for i in range(1_000)]
    big = InboxItem(event_id=f"{prefix}-{'e' * 60}", author_id=f"{prefix}-{'a' * 60}",
                    kind="post", created_at=now_ms(), priority="medium",
                    payload='{"x":"' + "y" * payload_chars + '"}', object_id="o" * 100)
    await cassandra_store.write_inbox(users, big, 3600)
    assert sum(sent) == len(users)
    if payload_chars == 10:
        assert max(sent) >= 64
    sample = await asyncio.gather(*(cassandra_store.read_inbox(u, None, 5) for u in users[::97]))
    assert all([i.event_id for i in inbox] == [big.event_id] for inbox in sample)


async def test_cassandra_waits_while_sockets_are_full(cassandra_store: CassandraStore,
                                                      prefix: str) -> None:
    """When the driver cannot send because every socket buffer is full (it raises
    ConnectionBusy), the store waits and sends again instead of failing the fan-out. The
    full buffer is staged on the real connection by the flag the driver's writer sets."""
    connections = [pool._connection for pool in cassandra_store.session._pools.values()]
    users = [f"{prefix}-u{i}" for i in range(300)]
    item = InboxItem(event_id=f"{prefix}-e", author_id="a", kind="post", created_at=now_ms(),
                     priority="medium", payload='{"n":1}')
    for conn in connections:
        conn._socket_writable = False
    try:
        write = asyncio.ensure_future(cassandra_store.write_inbox(users, item, 3600))
        await asyncio.sleep(0.2)
        assert not write.done()  # held back, not failed
    finally:
        for conn in connections:
            conn._socket_writable = True
    await asyncio.wait_for(write, 10)
    sample = await asyncio.gather(*(cassandra_store.read_inbox(u, None, 5) for u in users[::29]))
    assert all([i.event_id for i in inbox] == [item.event_id] for inbox in sample)


T = TypeVar("T")


async def until_resent(store: CassandraStore, endpoints: Endpoints, kind: str, normal_ms: int,
                       work: Callable[[], Awaitable[T]]) -> tuple[T, int]:
    """Start ``work()`` once the nodes' ``kind`` timeout (``nodetool settimeout``) is cut to
    1 ms, put it back to ``normal_ms`` as soon as the store has sent a request again (or the
    work is done); returns what the work gave and how many requests were sent again."""
    resent = store.requests_resent
    await asyncio.to_thread(local_nodetool, endpoints, "settimeout", kind, "1")
    running = asyncio.ensure_future(work())
    try:
        for _ in range(200):
            if store.requests_resent > resent or running.done():
                break
            await asyncio.sleep(0.05)
    finally:
        await asyncio.to_thread(local_nodetool, endpoints, "settimeout", kind, str(normal_ms))
    result = await asyncio.wait_for(running, 120)
    return result, store.requests_resent - resent


async def test_cassandra_resends_a_batch_after_a_write_timeout(
        cassandra_store: CassandraStore, endpoints: Endpoints, prefix: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An overloaded node answers some batches with a write timeout; the store sends each
    such batch again by itself rather than failing the whole fan-out. Real timeouts: the
    node's write timeout is cut to 1 ms (nodetool) while 3,000 rows are written, and put
    back once a batch has been sent again; every inbox ends with exactly the one row. The
    test allows more tries than production does, so that putting the timeout back (a JVM
    start) cannot outlast them on a busy machine."""
    monkeypatch.setattr(cassandra_module, "TIMEOUT_TRIES", 60)
    users = [f"{prefix}-u{i}" for i in range(3_000)]
    item = InboxItem(event_id=f"{prefix}-e", author_id="a", kind="post", created_at=now_ms(),
                     priority="medium", payload='{"n":1}')
    _, resent = await until_resent(cassandra_store, endpoints, "write", 2000,
                                   lambda: cassandra_store.write_inbox(users, item, 3600))
    assert resent > 0  # timeouts did happen
    inboxes = await asyncio.gather(*(cassandra_store.read_inbox(u, None, 5) for u in users))
    assert all([i.event_id for i in inbox] == [item.event_id] for inbox in inboxes)


async def test_cassandra_follow_counts_once_when_a_transaction_is_unsure(
        cassandra_store: CassandraStore, prefix: str) -> None:
    """A follow's lightweight transaction can time out after it took effect (or a cluster
    answers "CAS operation result is unknown"): the store asks again with the same op, and
    a refusal showing that op is its own edge, counted once. Here the answer of an applied
    attempt is lost by hand (the edge written with the op, as that attempt would have);
    ``test_unsure_transactions_on_the_cluster`` makes the nodes time out for real."""
    store, author = cassandra_store, f"{prefix}-star"
    op = uuid.uuid4()
    await store._q("follow", f"{prefix}-lost", author, op)  # applied; its answer was lost
    assert await store._follow(f"{prefix}-lost", author, op)  # the retry sees its own op
    assert not await store.follow(f"{prefix}-lost", author)  # another call's op: not new
    assert await store.counts(author) == (1, 0)
    assert await store.counts(f"{prefix}-lost") == (0, 1)
    # The unknown outcome a cluster reports is an unsure write, retried; never a 500.
    unknown = cassandra_module._server_error(ErrorMessage(0x1700, "proposal accepted by 1", None))
    assert isinstance(unknown, cassandra_module._WriteTimedOut)
    assert isinstance(cassandra_module._server_error(ErrorMessage(0x1001, "busy", None)),
                      RetryableError)

    assert not await store.unfollow(f"{prefix}-stranger", author)  # no edge: no count
    assert await store.counts(author) == (1, 0)


@pytest.mark.cluster
async def test_unsure_transactions_on_the_cluster(
        cassandra_store: CassandraStore, endpoints: Endpoints, prefix: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Real unsure answers (a single node answers its own Paxos rounds in time, so this runs
    under ``make test-cluster``): the nodes' CAS contention timeout cut to 1 ms while 400
    fans follow and 100 events are stored at once, and put back once a transaction has been
    asked again; every follow counts once and every insert is its own (it recognises its
    own bytes). Then 100 of the fans and 50 strangers unfollow under the same cut: an
    unfollow reads the edge first, so only the real edges count down."""
    store, author = cassandra_store, f"{prefix}-star"
    monkeypatch.setattr(cassandra_module, "TIMEOUT_TRIES", 60)
    fans = [f"{prefix}-f{i:03d}" for i in range(400)]
    events = [event(f"{prefix}-e{i:03d}") for i in range(100)]
    results, resent = await until_resent(
        store, endpoints, "cascontention", 1000, lambda: asyncio.gather(
            *(store.follow(f, author) for f in fans),
            *(store.insert_event(e, 3600) for e in events)))
    assert resent > 0  # transactions were unsure and asked again
    assert results[:len(fans)] == [True] * len(fans)
    assert results[len(fans):] == [None] * len(events)  # each insert is its own, not a dup
    assert [await store.get_event(e.event_id) for e in events] == events
    assert await store.counts(author) == (400, 0)
    assert [await store.counts(f) for f in fans[::37]] == [(0, 1)] * len(fans[::37])

    strangers = [f"{prefix}-s{i:03d}" for i in range(50)]  # never followed: nothing to undo
    unfollowed, resent = await until_resent(
        store, endpoints, "cascontention", 1000, lambda: asyncio.gather(
            *(store.unfollow(f, author) for f in [*fans[:100], *strangers])))
    assert unfollowed == [True] * 100 + [False] * 50
    assert resent > 0
    assert await store.counts(author) == (300, 0)
    assert await store.counts(fans[0]) == (0, 0)
    assert await store.counts(strangers[0]) == (0, 0)


async def test_cassandra_store_names_a_missing_keyspace(
        endpoints: Endpoints, cassandra: CassandraKeyspace, prefix: str) -> None:
    """A worker or API started before ``feedsvc migrate`` says so, not with a driver trace:
    whether the keyspace is missing or only its tables are."""
    with pytest.raises(ConfigError, match=r"no keyspace .*feedsvc migrate"):
        await CassandraStore.open(endpoints.cassandra_hosts, "feedsvc_never_migrated")
    empty = f"feedsvc_empty_{prefix}"
    await asyncio.to_thread(
        cassandra.session.execute, f"CREATE KEYSPACE {empty} WITH replication = "
        "{'class': 'SimpleStrategy', 'replication_factor': 1}", timeout=60)
    try:
        with pytest.raises(ConfigError, match=r"not migrated.*feedsvc migrate"):
            await CassandraStore.open(endpoints.cassandra_hosts, empty)
    finally:
        await asyncio.to_thread(cassandra.session.execute, f"DROP KEYSPACE {empty}",
                                timeout=60)


async def test_cassandra_keyspace_name_is_case_insensitive(
        endpoints: Endpoints, cassandra: CassandraKeyspace) -> None:
    """CQL folds an unquoted keyspace name to lower case, so FEEDSVC_KEYSPACE may use any
    case once migrated."""
    store = await CassandraStore.open(endpoints.cassandra_hosts, cassandra.keyspace.upper())
    try:
        assert store.keyspace == cassandra.keyspace
        assert await store.counts("nobody") == (0, 0)
    finally:
        await store.close()


async def test_a_notifications_records_and_message_ids_go_in_one_batch(
        runtime: Runtime, prefix: str) -> None:
    """``record_many`` / ``remember_many``: what a channel task writes once all its targets
    answered (one request each on Cassandra), read back like single writes."""
    log, receipts, user = runtime.delivery.log, runtime.policy.receipts, f"{prefix}-u"
    event_id = f"{prefix}-e"
    await log.record_many(event_id, user, [
        DeliveryRecord("push", "b", "sent", attempts=1, updated_at=5),
        DeliveryRecord("push", "a", "suppressed", "channel_not_configured", updated_at=5),
    ], 3600)
    await log.record_many(event_id, user, [], 3600)  # nothing to write: no request
    await log.record_many(event_id, user, [DeliveryRecord("push", "a", "sent", attempts=2,
                                                          updated_at=6)], 3600)  # upserts
    assert [(r.target, r.status, r.attempts) for r in await log.records(event_id, user)] == [
        ("a", "sent", 2), ("b", "sent", 1)]
    refs = [SentRef(event_id, user, "push", target, f"tok-{target}") for target in "ab"]
    await receipts.remember_many([("fcm", f"{prefix}-m1", refs[0]),
                                  ("apns", f"{prefix}-m2", refs[1])], 3600)
    assert await receipts.find("fcm", f"{prefix}-m1") == refs[0]
    assert await receipts.find("apns", f"{prefix}-m2") == refs[1]
    assert await receipts.find("fcm", f"{prefix}-m2") is None
    assert await receipts.forget_user(user) == 2  # both indexed by the recipient
    assert await receipts.find("fcm", f"{prefix}-m1") is None
