"""Fast follow-graph loader for benchmarks only.

The product's follow path writes each edge with a lightweight transaction so that repeated
follows change counts once; that costs a Paxos round per edge (about 1k edges/s here), far
too slow to build a million-follower author for every benchmark run. This loader writes
the same tables (``following_by_user``, ``followers_by_author``, ``follow_counts``,
``author_modes``) for a graph known to be free of duplicates, with replica-grouped unlogged
batches and one counter update per user. Never use it on a live keyspace.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import Future
from typing import Any

from cassandra import OperationTimedOut, WriteTimeout
from cassandra.query import BatchStatement, BatchType

from feedsvc.graph import next_mode
from feedsvc.store.cassandra import CassandraStore, follower_shard

BATCH = 100
IN_FLIGHT = 64
TRIES = 5  # a counter update that timed out is sent again (see ``_counts``)


async def load_edges(store: CassandraStore, edges: Iterable[tuple[str, str]],
                     threshold: int, chunk: int = 20_000) -> int:
    """Write (follower, author) edges; returns how many were written."""
    ks = store.keyspace
    session = store.session
    fwd = await asyncio.to_thread(
        session.prepare, f"INSERT INTO {ks}.following_by_user (user_id, author_id) VALUES (?, ?)")
    rev = await asyncio.to_thread(
        session.prepare,
        f"INSERT INTO {ks}.followers_by_author (author_id, shard, follower_id) VALUES (?, ?, ?)")
    followers: Counter[str] = Counter()
    following: Counter[str] = Counter()
    limit = asyncio.Semaphore(IN_FLIGHT)

    async def send(batch: BatchStatement) -> None:
        async with limit:
            await asyncio.wrap_future(_as_future(session.execute_async(batch)))
        batch.clear()  # the driver keeps finished requests referenced for their timeout

    buffer: list[tuple[str, str]] = []
    total = 0

    async def flush() -> None:
        batches = []
        by_user = sorted(buffer)
        for start in range(0, len(by_user), BATCH):
            batch = BatchStatement(batch_type=BatchType.UNLOGGED)
            for follower, author in by_user[start:start + BATCH]:
                batch.add(fwd, (follower, author))
            batches.append(batch)
        by_author = sorted(buffer, key=lambda e: (e[1], follower_shard(e[0])))
        for start in range(0, len(by_author), BATCH):
            batch = BatchStatement(batch_type=BatchType.UNLOGGED)
            for follower, author in by_author[start:start + BATCH]:
                batch.add(rev, (author, follower_shard(follower), follower))
            batches.append(batch)
        await asyncio.gather(*(send(b) for b in batches))

    for edge in edges:
        buffer.append(edge)
        following[edge[0]] += 1
        followers[edge[1]] += 1
        if len(buffer) >= chunk:
            await flush()
            total += len(buffer)
            buffer.clear()
    if buffer:
        await flush()
        total += len(buffer)
    await _counts(store, followers, following, threshold)
    return total


async def _counts(store: CassandraStore, followers: Counter[str], following: Counter[str],
                  threshold: int) -> None:
    ks, session = store.keyspace, store.session
    counter = "UPDATE {ks}.follow_counts SET {c} = {c} + ? WHERE user_id = ?"
    up_followers = await asyncio.to_thread(
        session.prepare, counter.format(ks=ks, c="followers"))
    up_following = await asyncio.to_thread(
        session.prepare, counter.format(ks=ks, c="following"))
    updates = iter([(up_followers, (n, u)) for u, n in followers.items()]
                   + [(up_following, (n, u)) for u, n in following.items()])

    async def lane() -> None:
        # IN_FLIGHT lanes over one iterator, not a task per user: a million pending tasks
        # made one failure's cancellation take longer than the benchmark.
        for statement, params in updates:
            for attempt in range(1, TRIES + 1):
                try:
                    await asyncio.wrap_future(_as_future(session.execute_async(statement,
                                                                               params)))
                    break
                except (OperationTimedOut, WriteTimeout):
                    # A counter is not idempotent: a timed-out update may have landed, so
                    # a retry can count one user twice. Harmless for a benchmark's graph
                    # (the threshold is far from every author's count); losing the load
                    # to one timeout is not.
                    if attempt == TRIES:
                        raise
                    await asyncio.sleep(0.5 * attempt)

    await asyncio.gather(*(lane() for _ in range(IN_FLIGHT)))
    celebrities = [u for u, n in followers.items() if next_mode("push", n, threshold) == "pull"]
    await asyncio.gather(*(store.set_mode(u, "pull") for u in celebrities))


def _as_future(response: Any) -> Future[Any]:
    """A concurrent.futures.Future completed by the driver's callbacks."""
    future: Future[Any] = Future()
    response.add_callbacks(future.set_result, future.set_exception)
    return future
