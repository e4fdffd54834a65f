"""The README's read semantics with the read caches on and two API processes (real
``feedsvc api`` subprocesses on the Cassandra + Redis backend, one ``feedsvc worker``): what
one process is told, the other shows on its very next read. Also: ``feedsvc api --processes
2`` serves from both processes on one port, and ``feedsvc worker --processes 2`` drains."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from feedsvc.auth import issue_token
from feedsvc.queue.redis import RedisQueue
from loadtest.ceilings import free_port
from tests.conftest import JWT_SECRET, SERVICE_KEY, CassandraKeyspace
from tests.servers import Endpoints

pytestmark = pytest.mark.timeout(240)

THRESHOLD = 4
SERVICE = {"Authorization": f"Bearer {SERVICE_KEY}"}


def process_env(endpoints: Endpoints, keyspace: str, prefix: str, **extra: str
                ) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEEDSVC_")}
    env.update({
        "FEEDSVC_CASSANDRA_HOSTS": ",".join(endpoints.cassandra_hosts),
        "FEEDSVC_REDIS_URL": endpoints.redis_url,
        "FEEDSVC_REDIS_CLUSTER": str(endpoints.redis_cluster).lower(),
        "FEEDSVC_KEYSPACE": keyspace, "FEEDSVC_QUEUE_PREFIX": prefix,
        "FEEDSVC_SERVICE_KEYS": SERVICE_KEY, "FEEDSVC_JWT_SECRET": JWT_SECRET,
        "FEEDSVC_CELEBRITY_THRESHOLD": str(THRESHOLD), "FEEDSVC_CLAIM_IDLE": "2s",
        # Long TTLs: what the tests see fresh, the notices and versions made fresh.
        "FEEDSVC_HEAD_TTL": "10m", "FEEDSVC_FOLLOWING_TTL": "10m", "FEEDSVC_PULL_SET_TTL": "10m",
    })
    env.update(extra)
    return env


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "feedsvc.cli", "--log-level", "INFO",
                                 *args], env=env, stdout=out, stderr=subprocess.STDOUT)


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def text(log: Path) -> str:
    return log.read_text()


def ended(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    return not status.exists() or "zombie" in status.read_text()


async def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 90
    async with aiohttp.ClientSession() as session:
        while True:
            assert proc.poll() is None, text(log)
            try:
                async with session.get(f"{url}/readyz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < deadline, text(log)
            await asyncio.sleep(0.2)


class Fleet:
    """Two API processes (``a``, ``b``) and a worker; one method per call the tests make."""

    def __init__(self, session: aiohttp.ClientSession, urls: dict[str, str], prefix: str,
                 queue: RedisQueue) -> None:
        self.session, self.urls, self.prefix, self.queue = session, urls, prefix, queue
        self._seq = 0

    def user(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    async def post(self, via: str, author: str, **fields: Any) -> dict[str, Any]:
        self._seq += 1
        body = {"event_id": f"{self.prefix}-e{self._seq}", "author_id": author,
                "kind": "post", "payload": {"n": self._seq}, **fields}
        async with self.session.post(f"{self.urls[via]}/v1/events", json=body,
                                     headers=SERVICE) as response:
            assert response.status == 202, await response.text()
            accepted: dict[str, Any] = await response.json()
            return accepted

    async def follow(self, via: str, user: str, author: str, *, undo: bool = False) -> None:
        method = self.session.delete if undo else self.session.put
        async with method(f"{self.urls[via]}/v1/users/{user}/following/{author}",
                          headers=SERVICE) as response:
            assert response.status == 204, await response.text()

    async def page(self, via: str, user: str, limit: int = 50,
                   cursor: str | None = None) -> dict[str, Any]:
        params = {"limit": str(limit), **({"cursor": cursor} if cursor else {})}
        headers = {"Authorization": f"Bearer {issue_token(JWT_SECRET, user, 600)}"}
        async with self.session.get(f"{self.urls[via]}/v1/inbox", params=params,
                                    headers=headers) as response:
            assert response.status == 200, await response.text()
            body: dict[str, Any] = await response.json()
            return body

    async def ids(self, via: str, user: str, limit: int = 50) -> list[str]:
        """Every page, the processes taking turns page by page."""
        out: list[str] = []
        cursor: str | None = None
        turn = [via, "b" if via == "a" else "a"]
        while True:
            body = await self.page(turn[len(out) // limit % 2], user, limit, cursor)
            out += [i["event_id"] for i in body["items"]]
            cursor = body["next_cursor"]
            if cursor is None:
                return out

    async def drain(self) -> None:
        """Until the worker has acknowledged everything queued."""
        deadline = time.monotonic() + 60
        while sum((await self.queue.stats()).depth.values()):
            assert time.monotonic() < deadline, "the worker did not drain the queue"
            await asyncio.sleep(0.05)


@pytest.fixture
async def fleet(endpoints: Endpoints, cassandra: CassandraKeyspace, prefix: str,
                tmp_path: Path) -> AsyncIterator[Fleet]:
    env = process_env(endpoints, cassandra.keyspace, prefix)
    log = tmp_path / "fleet.log"
    ports = {"a": free_port(), "b": free_port()}
    procs = [spawn(["api", "--processes", "1", "--port", str(port)], env, log)
             for port in ports.values()]
    procs.append(spawn(["worker", "--processes", "1", "--concurrency", "2"], env, log))
    queue = await RedisQueue.open(endpoints.redis_url, prefix=prefix,
                                  cluster=endpoints.redis_cluster)
    try:
        urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
        for url, proc in zip(urls.values(), procs, strict=False):
            await wait_ready(url, proc, log)
        async with aiohttp.ClientSession() as session:
            yield Fleet(session, urls, prefix, queue)
        assert all(p.poll() is None for p in procs), log.read_text()
    finally:
        stop(procs)
        keys = [k async for k in queue.redis.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await queue.redis.delete(*keys)
        await queue.close()


async def make_celebrity(fleet: Fleet, name: str) -> str:
    celebrity = fleet.user(name)
    for i in range(THRESHOLD):
        await fleet.follow("a", fleet.user(f"{name}-fan{i}"), celebrity)
    return celebrity


async def test_unfollow_and_follow_show_at_once_on_the_other_process(fleet: Fleet) -> None:
    reader, friend = fleet.user("reader"), fleet.user("friend")
    celebrity = await make_celebrity(fleet, "celeb")
    await fleet.follow("a", reader, friend)
    pushed = (await fleet.post("a", friend))["event_id"]
    pulled = await fleet.post("a", celebrity)
    assert pulled["route"] == "pull"
    await fleet.drain()
    for via in ("a", "b"):  # both processes have the reader's list and the head cached
        assert await fleet.ids(via, reader) == [pushed]
    await fleet.follow("a", reader, celebrity)
    assert await fleet.ids("b", reader) == [pulled["event_id"], pushed]
    await fleet.follow("b", reader, friend, undo=True)
    assert await fleet.ids("a", reader) == [pulled["event_id"]]
    await fleet.follow("a", reader, celebrity, undo=True)
    assert await fleet.ids("b", reader) == []
    assert await fleet.ids("a", reader) == []


async def test_a_celebrity_post_is_read_on_every_process_within_a_second(fleet: Fleet) -> None:
    celebrity = await make_celebrity(fleet, "star")
    readers = [fleet.user(f"r{i}") for i in range(3)]
    for reader in readers:
        await fleet.follow("a", reader, celebrity)
    first = (await fleet.post("a", celebrity))["event_id"]
    for via in ("a", "b"):
        for reader in readers:  # heads cached everywhere (TTL 10 minutes)
            assert await fleet.ids(via, reader) == [first]
    async def first_read_showing(via: str, reader: str, event_id: str, at: float) -> float:
        """Seconds from the 202 (``at``) to the sending of the first read that shows the
        event (reads run back to back, so a busy machine's slow answers do not add up)."""
        while True:
            sent = time.monotonic()
            body = await fleet.page(via, reader)
            if body["items"] and body["items"][0]["event_id"] == event_id:
                return sent - at
            assert sent - at < 10, f"{event_id} not shown by {via} after 10 s"

    for n in range(3):
        accepted = await fleet.post("ab"[n % 2], celebrity)
        at = time.monotonic()
        delays = await asyncio.gather(*(first_read_showing(via, readers[n],
                                                           accepted["event_id"], at)
                                        for via in ("a", "b")))
        assert max(delays) < 1.0, f"post {n}: shown after {delays} s"


async def test_pages_across_processes_under_arrivals(fleet: Fleet) -> None:
    """Newest first, no duplicates and stable cursors while new events arrive, pages taken
    from both processes in turn; events sharing an object collapse into the newest."""
    reader = fleet.user("pager")
    friends = [fleet.user(f"f{i}") for i in range(3)]
    celebrities = [await make_celebrity(fleet, f"c{i}") for i in range(2)]
    for author in friends + celebrities:
        await fleet.follow("a", reader, author)
    for round_ in range(8):
        for author in friends + celebrities:
            await fleet.post("ab"[round_ % 2], author, created_at=int(time.time() * 1000))
    shared = [await fleet.post("a", friends[0], object_id="o-1"),
              await fleet.post("b", celebrities[0], object_id="o-1")]
    await fleet.drain()
    whole = await fleet.ids("a", reader, limit=7)
    assert len(whole) == 8 * 5 + 1 and len(set(whole)) == len(whole)
    assert whole[0] == shared[1]["event_id"] and shared[0]["event_id"] not in whole

    seen: list[str] = []
    cursor: str | None = None
    times: list[str] = []
    pages = 0
    while True:
        body = await fleet.page("ab"[pages % 2], reader, 6, cursor)
        pages += 1
        seen += [i["event_id"] for i in body["items"]]
        times += [i["created_at"] for i in body["items"]]
        # New events by every kind of author while the reader pages.
        await fleet.post("a", friends[pages % 3])
        await fleet.post("b", celebrities[pages % 2])
        await fleet.drain()
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == whole  # arrivals never shift or repeat later pages
    assert times == sorted(times, reverse=True)


async def test_threshold_crossings_on_two_processes(fleet: Fleet) -> None:
    author = fleet.user("riser")
    pool = [fleet.user(f"p{i}") for i in range(THRESHOLD + 2)]
    posted: list[str] = []
    routes: list[str] = []
    following: list[str] = []

    async def check() -> None:
        await fleet.drain()
        for i, user in enumerate(pool):
            ids = await fleet.ids("ab"[i % 2], user, limit=3)
            assert len(ids) == len(set(ids)), f"{user} sees a duplicate"
            assert set(ids) == (set(posted) if user in following else set()), user

    for i, user in enumerate(pool):  # up across the threshold ...
        await fleet.follow("ab"[i % 2], user, author)
        following.append(user)
        accepted = await fleet.post("ba"[i % 2], author)
        posted.append(accepted["event_id"])
        routes.append(accepted["route"])
        await check()
    for i, user in enumerate(pool[:3]):  # ... and back down below 90% of it
        await fleet.follow("ab"[i % 2], user, author, undo=True)
        following.remove(user)
        accepted = await fleet.post("a", author)
        posted.append(accepted["event_id"])
        routes.append(accepted["route"])
        await check()
    assert "pull" in routes and routes[0] == routes[-1] == "push"


# --- several processes of one command ------------------------------------------------


def children(pid: int) -> list[int]:  # Linux /proc, like SO_REUSEPORT balancing
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def server_connections(pid: int, port: int) -> int:
    """Established connections on local ``port`` whose socket ``pid`` holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == "01" and fields[9] in inodes:
                count += 1
    return count


@pytest.fixture
def env(endpoints: Endpoints, cassandra: CassandraKeyspace, prefix: str) -> Iterator[
        dict[str, str]]:
    yield process_env(endpoints, cassandra.keyspace, prefix)


async def test_api_processes_share_the_port(env: dict[str, str], tmp_path: Path) -> None:
    log = tmp_path / "api.log"
    port = free_port()
    parent = spawn(["api", "--processes", "2", "--port", str(port)], env, log)
    try:
        url = f"http://127.0.0.1:{port}"
        await wait_ready(url, parent, log)
        deadline = time.monotonic() + 30
        while len(children(parent.pid)) < 2:
            assert time.monotonic() < deadline, log.read_text()
            await asyncio.sleep(0.1)
        kids = children(parent.pid)
        # 32 kept-alive connections, each answered once: the kernel spreads them over the
        # two processes (all on one, by chance: 2 in 2^31).
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        async with aiohttp.ClientSession(connector=connector) as session:
            async def once() -> int:
                async with session.get(f"{url}/readyz") as response:
                    await asyncio.sleep(0.5)  # hold the connection while the others open
                    return response.status

            assert await asyncio.gather(*(once() for _ in range(32))) == [200] * 32
            held = {kid: server_connections(kid, port) for kid in kids}
        assert all(n > 0 for n in held.values()), held
        assert sum(held.values()) == 32, held
    finally:
        stop([parent])
    assert parent.returncode == 0, log.read_text()
    assert all(ended(kid) for kid in kids)  # the children stopped with the parent


async def test_worker_processes_drain_together(env: dict[str, str], prefix: str,
                                               endpoints: Endpoints, tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    api_port = free_port()
    api = spawn(["api", "--processes", "1", "--port", str(api_port)], env, log)
    queue = await RedisQueue.open(endpoints.redis_url, prefix=prefix,
                                  cluster=endpoints.redis_cluster)
    try:
        url = f"http://127.0.0.1:{api_port}"
        await wait_ready(url, api, log)
        async with aiohttp.ClientSession() as session:
            fleet = Fleet(session, {"a": url}, prefix, queue)
            author, fans = fleet.user("w"), [fleet.user(f"wf{i}") for i in range(3)]
            for fan in fans:
                await fleet.follow("a", fan, author)
            posted = [(await fleet.post("a", author))["event_id"] for _ in range(6)]
            worker = spawn(["worker", "--processes", "2", "--burst"], env, log)
            assert await asyncio.to_thread(worker.wait, 120) == 0, log.read_text()
            for fan in fans:
                body = await fleet.page("a", fan)
                assert [i["event_id"] for i in body["items"]] == posted[::-1]
    finally:
        stop([api])
        keys = [k async for k in queue.redis.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await queue.redis.delete(*keys)
        await queue.close()
