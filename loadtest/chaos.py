"""``make chaos``: faults under a steady posting and reading load, then an exact count.

Each scenario starts one API and two worker processes (4 consumers each) on a fresh graph
of push authors and one pull author, posts events at a steady rate while readers page
inboxes, injects one kind of fault, and then waits until every accepted event has reached
every follower. It prints one table row per scenario: accepted, delivered, lost and
duplicated (user, event) pairs, reads, 5xx answers other than 503, and the seconds from
the end of the fault (or of the posting, if later) until everything accepted was delivered
(polled every few seconds, so it over-reads by up to one poll). Zero lost and zero
duplicated in every row is the bar.

Scenarios (``--scenarios``): ``worker`` (a worker SIGKILLed five times, restarted each
time), ``redis`` (the local Redis SIGKILLed mid-stream, down 10 s, restarted from its AOF;
no client retries), ``cassandra`` (the local node SIGSTOPped for 30 s), ``api`` (the API
SIGKILLed mid-stream and restarted; clients retry). With ``--cluster``, against the local
three-node Cassandra (RF 3) and Redis Cluster (three queue shards): ``cassandra-node`` (one
node SIGKILLed for 60 s, then restarted) and ``redis-primary`` (a primary SIGKILLed, its
replica takes over; the node comes back as a replica). It kills the project's local servers
(``scripts/services.py``): run it on purpose, never beside other work on them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from feedsvc.runtime import open_runtime
from loadtest.bench import SERVICE_KEY, Env, fresh_keyspace, wait_http
from loadtest.ceilings import free_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "loadtest" / "results"
PUSH_AUTHORS = 10
USERS = 400
PULL_FOLLOWERS = 320  # above THRESHOLD: the pull author
THRESHOLD = 300
WORKERS = 2
RECOVERY_LIMIT_S = 240.0


def log(message: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Tally:
    accepted: set[str] = field(default_factory=set)
    refused: Counter[int] = field(default_factory=Counter)  # final status of a post not accepted
    statuses: Counter[int] = field(default_factory=Counter)  # every answer, posts and reads
    reads: int = 0
    read_duplicates: int = 0
    read_disorder: int = 0
    fault_end: float = 0.0


class Fleet:
    """The API and worker processes of one scenario; killed and restarted on demand."""

    def __init__(self, env: dict[str, str], port: int, log_dir: Path) -> None:
        self.env, self.port, self.log_dir = env, port, log_dir
        self.api: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []

    def _spawn(self, name: str, *cmd: str) -> subprocess.Popen[bytes]:
        with (self.log_dir / f"{name}.log").open("ab") as out:  # the child keeps its copy
            return subprocess.Popen([sys.executable, "-m", "feedsvc.cli", "--log-level",
                                     "WARNING", *cmd], env=self.env, stdout=out,
                                    stderr=subprocess.STDOUT)

    def start_api(self) -> None:
        self.api = self._spawn("api", "api", "--processes", "1", "--port", str(self.port))

    def start_worker(self) -> None:
        self.workers.append(self._spawn(f"worker{len(self.workers)}", "worker",
                                        "--processes", "1", "--concurrency", "4"))

    def kill_api(self) -> None:
        assert self.api is not None
        self.api.send_signal(signal.SIGKILL)
        self.api.wait()

    def kill_worker(self) -> None:
        victim = random.choice([w for w in self.workers if w.poll() is None])
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        self.workers.remove(victim)

    def workers_alive(self) -> int:
        return sum(w.poll() is None for w in self.workers)

    def exited(self) -> list[str]:
        """The processes that ended on their own (not killed by a fault), with their exit
        status: none should."""
        procs = [("api", self.api)] if self.api else []
        procs += [(f"worker pid {w.pid}", w) for w in self.workers]
        return [f"{name}: {proc.returncode}" for name, proc in procs
                if proc.poll() is not None]

    def stop(self) -> None:
        for proc in [*self.workers, *([self.api] if self.api else [])]:
            if proc.poll() is None:
                proc.terminate()
        for proc in [*self.workers, *([self.api] if self.api else [])]:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def services(*args: str) -> str:
    """``scripts/services.py ARGS`` (kill, pause, resume, start, ... a local server)."""
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "services.py"), *args],
                          check=True, capture_output=True, text=True).stdout


# --- load -----------------------------------------------------------------------------------


async def post_loop(url: str, authors: Sequence[str], posts: int, rate: float, tag: str,
                    retries: bool, tally: Tally) -> None:
    headers = {"Authorization": f"Bearer {SERVICE_KEY}"}
    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def one(i: int) -> None:
            event_id = f"{tag}-{i}"
            body = {"event_id": event_id, "author_id": authors[i % len(authors)],
                    "kind": "post", "payload": {"i": i}}
            for attempt in range(60 if retries else 1):
                status = 0
                try:
                    async with session.post(f"{url}/v1/events", json=body,
                                            headers=headers) as response:
                        status = response.status
                        await response.read()
                except (aiohttp.ClientError, TimeoutError):
                    status = 0  # connection refused or reset: the API is down
                tally.statuses[status] += 1
                if status in (200, 202):
                    tally.accepted.add(event_id)
                    return
                if status not in (0, 503) or attempt == 59:
                    break
                await asyncio.sleep(min(2.0, 0.2 * (attempt + 1)))
            tally.refused[status] += 1

        started = time.monotonic()
        pending: list[asyncio.Task[None]] = []
        for i in range(posts):
            await asyncio.sleep(max(0.0, started + i / rate - time.monotonic()))
            pending.append(asyncio.create_task(one(i)))
        await asyncio.gather(*pending)


async def read_loop(url: str, users: Sequence[str], stop: asyncio.Event, tally: Tally) -> None:
    headers = {"Authorization": f"Bearer {SERVICE_KEY}"}
    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while not stop.is_set():
            user = random.choice(users)
            try:
                async with session.get(f"{url}/v1/inbox", params={"user_id": user,
                                       "limit": "50"}, headers=headers) as response:
                    tally.statuses[response.status] += 1
                    tally.reads += 1
                    if response.status == 200:
                        items = (await response.json())["items"]
                        ids = [item["event_id"] for item in items]
                        tally.read_duplicates += len(ids) - len(set(ids))
                        keys = [(item["created_at"], item["event_id"]) for item in items]
                        tally.read_disorder += keys != sorted(keys, reverse=True)
            except (aiohttp.ClientError, TimeoutError):
                tally.statuses[0] += 1
                await asyncio.sleep(0.2)


# --- faults ---------------------------------------------------------------------------------

Fault = Callable[[Fleet, Env, Tally], Coroutine[Any, Any, None]]


async def kill_workers(fleet: Fleet, env: Env, tally: Tally) -> None:
    for _ in range(5):
        await asyncio.sleep(3.0)
        fleet.kill_worker()
        log("worker SIGKILLed")
        fleet.start_worker()
    tally.fault_end = time.monotonic()


def outage(down: tuple[str, ...], up: tuple[str, ...], seconds: float, what: str) -> Fault:
    """A fault: 5 s into the load, ``services.py DOWN``; ``seconds`` later ``services.py
    UP``."""
    async def fault(fleet: Fleet, env: Env, tally: Tally) -> None:
        await asyncio.sleep(5.0)
        await asyncio.to_thread(services, *down)
        log(f"{what}; down for {seconds:.0f} s")
        try:
            await asyncio.sleep(seconds)
        finally:
            await asyncio.to_thread(services, *up)
        tally.fault_end = time.monotonic()
        log(f"{what}: back")

    return fault


kill_redis = outage(("kill", "redis"), ("start", "redis"), 10, "redis SIGKILLed")
pause_cassandra = outage(("pause", "cassandra"), ("resume", "cassandra"), 30,
                         "cassandra SIGSTOPped")
kill_cassandra_node = outage(("kill", "--cluster", "cassandra-2"),
                             ("restart", "--cluster", "cassandra-2"), 60,
                             "cassandra-2 SIGKILLed")
# The killed primary's replica takes over; the node comes back as a replica.
kill_redis_primary = outage(("kill", "--cluster", "redis-primary"),
                            ("start", "--cluster", "redis"), 20, "a redis primary SIGKILLed")


async def kill_api(fleet: Fleet, env: Env, tally: Tally) -> None:
    for _ in range(3):
        await asyncio.sleep(4.0)
        fleet.kill_api()
        log("api SIGKILLed")
        await asyncio.sleep(1.0)
        fleet.start_api()
    tally.fault_end = time.monotonic()


SCENARIOS: dict[str, tuple[str, Fault, bool]] = {
    "worker": ("worker SIGKILL x5", kill_workers, True),
    "cassandra-node": ("cluster: a Cassandra node SIGKILL, 60 s down, client retries",
                       kill_cassandra_node, True),
    "redis-primary": ("cluster: a Redis primary SIGKILL, replica takes over, client retries",
                      kill_redis_primary, True),
    "redis": ("Redis SIGKILL, 10 s down, no client retries", kill_redis, False),
    "cassandra": ("Cassandra SIGSTOP 30 s, client retries", pause_cassandra, True),
    "api": ("API SIGKILL x3, client retries", kill_api, True),
}


# --- one scenario ----------------------------------------------------------------------------


def build_graph(tag: str) -> tuple[dict[str, list[str]], str, list[str]]:
    rng = random.Random(tag)
    users = [f"{tag}-u{i:03d}" for i in range(USERS)]
    followers = {f"{tag}-a{i}": rng.sample(users, rng.randint(50, 200))
                 for i in range(PUSH_AUTHORS)}
    pull = f"{tag}-celebrity"
    followers[pull] = rng.sample(users, PULL_FOLLOWERS)
    return followers, pull, users


async def delivered_pairs(env: Env, keyspace: str, followers: dict[str, list[str]],
                          pull: str, accepted: set[str]) -> tuple[int, int, int]:
    """(expected pairs, lost, duplicated), read straight from the store."""
    settings = env.settings(keyspace, "chaos-check", THRESHOLD)
    async with open_runtime(settings) as rt:
        expected: dict[str, set[str]] = {}
        for event_id in accepted:
            author = event_id.rsplit("-e", 1)[0]
            audience = [author] if author == pull else [author, *followers[author]]
            for user in audience:
                expected.setdefault(user, set()).add(event_id)
        lost = duplicated = 0
        limit = asyncio.Semaphore(32)

        async def check(user: str, want: set[str]) -> tuple[int, int]:
            async with limit:
                rows = [r.event_id for r in await rt.store.read_inbox(user, None, 5_000)]
            counts = Counter(r for r in rows if r in accepted)
            return len(want - set(counts)), sum(c - 1 for c in counts.values() if c > 1)

        for missing, extra in await asyncio.gather(*(check(u, w) for u, w in expected.items())):
            lost += missing
            duplicated += extra
        since = rt.now_ms() - 3_600_000
        pulled = {i.event_id for i in await rt.store.author_events(pull, None, 5_000, since)}
        pull_events = {e for e in accepted if e.rsplit("-e", 1)[0] == pull}
        lost += len(pull_events - pulled)
        return sum(len(w) for w in expected.values()) + len(pull_events), lost, duplicated


async def run_scenario(env: Env, keyspace: str, name: str, posts: int, rate: float,
                       log_dir: Path) -> dict[str, Any]:
    title, fault, retries = SCENARIOS[name]
    tag = f"c{name}{int(time.time()) % 100000}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    settings = env.settings(keyspace, tag, THRESHOLD)
    proc_env = env.process_env(settings, port)
    fleet = Fleet(proc_env, port, log_dir)
    fleet.start_api()
    for _ in range(WORKERS):
        fleet.start_worker()
    tally = Tally()
    try:
        await wait_http(f"{url}/readyz")
        followers, pull, users = build_graph(tag)
        follows = [{"user_id": u, "author_id": a} for a, us in followers.items() for u in us]
        async with aiohttp.ClientSession() as session:
            for start in range(0, len(follows), 10_000):
                for attempt in range(10):  # a 503 is retried, as any client would
                    async with session.post(f"{url}/v1/follows/bulk", headers={
                            "Authorization": f"Bearer {SERVICE_KEY}"},
                            json={"follows": follows[start:start + 10_000]}) as response:
                        if response.status == 503 and attempt < 9:
                            await asyncio.sleep(2.0)
                            continue
                        assert response.status == 200, await response.text()
                        break
        log(f"{name}: {len(follows)} follows; posting {posts} events at {rate}/s")
        stop_reading = asyncio.Event()
        readers = [asyncio.create_task(read_loop(url, users, stop_reading, tally))
                   for _ in range(4)]
        author_ids = list(followers)
        faulting = asyncio.create_task(fault(fleet, env, tally))
        await post_loop_tagged(url, author_ids, posts, rate, retries, tally)
        posted = time.monotonic()
        await faulting
        log(f"{name}: {len(tally.accepted)} accepted; waiting for delivery")
        started = max(posted, tally.fault_end)
        while True:
            expected, lost, duplicated = await delivered_pairs(
                env, keyspace, followers, pull, tally.accepted)
            if lost == 0 or time.monotonic() - started > RECOVERY_LIMIT_S:
                break
            await asyncio.sleep(2.0)
        recovery = time.monotonic() - started
        exited = fleet.exited()
        if exited:
            log(f"{name}: processes that ended on their own: {', '.join(exited)}")
        stop_reading.set()
        await asyncio.gather(*readers)
    finally:
        fleet.stop()
    server_errors = sum(n for s, n in tally.statuses.items() if s >= 500 and s != 503)
    row = {"scenario": title, "accepted": len(tally.accepted), "pairs": expected,
           "lost": lost, "duplicated": duplicated, "reads": tally.reads,
           "read_duplicates": tally.read_duplicates, "read_disorder": tally.read_disorder,
           "5xx_not_503": server_errors, "refused": dict(tally.refused),
           "statuses": dict(tally.statuses), "recovery_s": round(recovery, 1),
           "exited": exited}
    log(f"{name}: {json.dumps(row)}")
    return row


async def post_loop_tagged(url: str, authors: Sequence[str], posts: int, rate: float,
                           retries: bool, tally: Tally) -> None:
    """Posts whose event ids name their author (``<author>-e-<i>``), for the check."""
    per_author = [posts // len(authors) + (i < posts % len(authors))
                  for i in range(len(authors))]
    await asyncio.gather(*(
        post_loop(url, [author], count, rate / len(authors), f"{author}-e", retries, tally)
        for author, count in zip(authors, per_author, strict=True)))


def table(rows: Sequence[dict[str, Any]]) -> str:
    head = ("| fault | accepted | delivered pairs | lost | duplicated | reads | read dups / "
            "disorder | 5xx other than 503 | recovery s |\n|---|---|---|---|---|---|---|---|---|")
    lines = [f"| {r['scenario']} | {r['accepted']} | {r['pairs'] - r['lost']} of {r['pairs']} "
             f"| {r['lost']} | {r['duplicated']} | {r['reads']} | {r['read_duplicates']} / "
             f"{r['read_disorder']} | {r['5xx_not_503']} | {r['recovery_s']} |" for r in rows]
    return "\n".join([head, *lines])


async def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every scenario of ``args``, in order, on a fresh keyspace; the table's rows."""
    if args.cluster:
        lines = services("start", "--cluster")
        values = dict(line.split("=", 1) for line in lines.splitlines() if "=" in line)
        env = Env(tuple(values["FEEDSVC_CASSANDRA_HOSTS"].split(",")),
                  values["FEEDSVC_REDIS_URL"], redis_cluster=True, shards=3,
                  replication=values["FEEDSVC_REPLICATION"])
    else:
        env = Env(tuple(os.environ["FEEDSVC_CASSANDRA_HOSTS"].split(",")),
                  os.environ["FEEDSVC_REDIS_URL"])
    keyspace = f"chaos_{int(time.time())}"
    await fresh_keyspace(env, keyspace)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_dir = RESULTS / f"chaos-{stamp}"
    log_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    scenarios = args.scenarios or ("worker,cassandra-node,redis-primary" if args.cluster
                                   else "worker,redis,cassandra,api")
    for name in scenarios.split(","):
        rows.append(await run_scenario(env, keyspace, name, args.posts, args.rate, log_dir))
    (RESULTS / f"chaos-{stamp}.json").write_bytes(msgspec.json.encode(rows))
    return rows


async def main_async(args: argparse.Namespace) -> int:
    rows = await run_all(args)
    print(table(rows))
    return 0 if all(r["lost"] == 0 and r["duplicated"] == 0 and r["5xx_not_503"] == 0
                    for r in rows) else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", default="",
                        help=f"comma list of {', '.join(SCENARIOS)} (default: the four "
                             "single-node ones, or with --cluster worker,cassandra-node,"
                             "redis-primary)")
    parser.add_argument("--cluster", action="store_true",
                        help="against the local cluster (scripts/services.py --cluster)")
    parser.add_argument("--posts", type=int, default=500)
    parser.add_argument("--rate", type=float, default=25.0, help="posts per second")
    return asyncio.run(main_async(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
