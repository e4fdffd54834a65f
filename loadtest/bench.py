"""The benchmark harness: ``python -m loadtest.bench [--quick]`` (``make bench``,
``make bench-quick``).

Every figure is measured in the same run as this machine's ceilings (``loadtest.ceilings``)
and printed as a ratio to them, so the ratios hold on any machine:

1. ceilings: raw Cassandra insert rate (best driver pattern), raw inbox-slice read rate,
   Redis XADD / SET NX / MGET, a no-op aiohttp handler under the harness's HTTP load
   generator and under wrk;
2. fan-out throughput end to end (events posted over HTTP, 1, 2 and 4 worker processes);
3. delivery latency: 202 of ``POST /v1/events`` -> the event readable in the inbox of the
   last follower, for authors with 10, 1,000 and 9,999 followers, idle and under load;
4. strategies on the same graph and events: hybrid, pure push, pure pull; reads per reader
   group with ``feedsvc api --processes`` 1 and 2 (wrk), the raw read ceiling on the push
   readers' inboxes, and the read targets as ratios (``read_ratios``);
5. locust, the mixed workload (``loadtest/locustfile.py``), on a power-law graph.

Results go to ``loadtest/results/`` (JSON, markdown, PNG charts). Needs Cassandra and Redis
(``FEEDSVC_CASSANDRA_HOSTS``, ``FEEDSVC_REDIS_URL``; ``make bench`` starts local ones).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from feedsvc import fanout, intake
from feedsvc.auth import issue_token
from feedsvc.config import Settings
from feedsvc.migrate import migrate
from feedsvc.model import FOLLOWER_PAGE, FanoutTask, InboxItem
from feedsvc.queue.redis import GROUP, RedisQueue
from feedsvc.runtime import Runtime, open_runtime
from feedsvc.seed import follow_pairs
from feedsvc.store.cassandra import CassandraStore, connect_cluster
from loadtest import ceilings
from loadtest.ceilings import busy_pct, free_port, machine_cpu, settle
from loadtest.graphload import load_edges
from loadtest.httpload import RequestPlan, percentile, run_load_in_process
from loadtest.report import write_report
from loadtest.wrk import run_wrk, wrk_binary

ROOT = Path(__file__).resolve().parent.parent
SERVICE_KEY = "bench-service-key"
JWT_SECRET = "bench-jwt-secret-0123456789abcdef0123456789"
THRESHOLD = 10_000
PAYLOAD = {"text": "x" * 100}
FANOUT_AUTHORS, FANOUT_FOLLOWERS, FANOUT_EVENTS = 10, 9_999, 60  # full size
FANOUT_REPEATS = 3  # rounds per worker count (full size), each after a ceiling run


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Env:
    """Where the servers are and how feedsvc processes of this run are configured (a Redis
    Cluster takes ``redis_cluster`` and a few ``shards``; a Cassandra cluster its
    ``replication``)."""

    def __init__(self, hosts: tuple[str, ...], redis_url: str, *, redis_cluster: bool = False,
                 shards: int = 1, replication: str = "SimpleStrategy:1") -> None:
        self.hosts, self.redis_url = hosts, redis_url
        self.redis_cluster, self.shards, self.replication = redis_cluster, shards, replication

    def settings(self, keyspace: str, prefix: str, threshold: int = THRESHOLD) -> Settings:
        return Settings(cassandra_hosts=self.hosts, redis_url=self.redis_url, keyspace=keyspace,
                        queue_prefix=prefix, celebrity_threshold=threshold,
                        service_keys=(SERVICE_KEY,), jwt_secret=JWT_SECRET,
                        redis_cluster=self.redis_cluster, queue_shards=self.shards)

    def process_env(self, settings: Settings, port: int | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FEEDSVC_")}
        env.update({
            "FEEDSVC_CASSANDRA_HOSTS": ",".join(self.hosts), "FEEDSVC_REDIS_URL": self.redis_url,
            "FEEDSVC_KEYSPACE": settings.keyspace, "FEEDSVC_QUEUE_PREFIX": settings.queue_prefix,
            "FEEDSVC_CELEBRITY_THRESHOLD": str(settings.celebrity_threshold),
            "FEEDSVC_SERVICE_KEYS": SERVICE_KEY, "FEEDSVC_JWT_SECRET": JWT_SECRET,
            "FEEDSVC_REDIS_CLUSTER": str(self.redis_cluster).lower(),
            "FEEDSVC_QUEUE_SHARDS": str(self.shards),
            "FEEDSVC_ACCESS_LOG": "false",  # no log line per request under load
        })
        if port is not None:
            env["FEEDSVC_PORT"] = str(port)
        return env


@contextmanager
def processes(commands: Sequence[tuple[list[str], dict[str, str]]]) -> Iterator[None]:
    """Run feedsvc processes for the duration of the block; always stopped after."""
    running = [subprocess.Popen([sys.executable, "-m", "feedsvc.cli", "--log-level", "WARNING",
                                 *cmd], env=env, stdout=subprocess.DEVNULL)
               for cmd, env in commands]
    try:
        yield
    finally:
        for proc in running:
            proc.terminate()
        for proc in running:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def wait_http(url: str, within_s: float = 60.0) -> None:
    deadline = time.monotonic() + within_s
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer")
            await asyncio.sleep(0.2)


async def fresh_keyspace(env: Env, keyspace: str) -> None:
    cluster, session = await asyncio.to_thread(connect_cluster, env.hosts)
    try:
        await asyncio.to_thread(session.execute, f"DROP KEYSPACE IF EXISTS {keyspace}",
                                timeout=180)
        await asyncio.to_thread(migrate, session, keyspace, env.replication)
    finally:
        await asyncio.to_thread(cluster.shutdown)


async def clear_queue(rt: Runtime) -> None:
    """Start from empty streams (a previous run may have been interrupted)."""
    assert isinstance(rt.queue, RedisQueue)
    await rt.queue.redis.delete(*rt.queue.all_streams())
    for stream in rt.queue.all_streams():
        await rt.queue.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)


async def queue_depth(rt: Runtime) -> int:
    return sum((await rt.queue.stats()).depth.values())


async def wait_drained(rt: Runtime, within_s: float = 900.0) -> None:
    deadline = time.monotonic() + within_s
    while await queue_depth(rt):
        if time.monotonic() > deadline:
            raise TimeoutError("the queue did not drain")
        await asyncio.sleep(0.02)


async def post_events(url: str, bodies: Sequence[dict[str, Any]], concurrency: int = 8
                      ) -> list[float]:
    """POST the events; returns the time each 202 arrived (perf_counter)."""
    headers = {"Authorization": f"Bearer {SERVICE_KEY}"}
    stamps: list[float] = [0.0] * len(bodies)
    queue = list(enumerate(bodies))

    async def loop(session: aiohttp.ClientSession) -> None:
        while queue:
            i, body = queue.pop(0)
            async with session.post(f"{url}/v1/events", json=body, headers=headers) as r:
                if r.status != 202:
                    raise RuntimeError(f"POST /v1/events: {r.status} {await r.text()}")
                stamps[i] = time.perf_counter()

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(loop(session) for _ in range(concurrency)))
    return stamps


def inbox_item_bytes() -> int:
    """Size of the serialized inbox item a fan-out event of this harness writes per row, so the
    ceiling inserts rows of the same size."""
    body = event("fa0", "tp1-0")
    item = InboxItem(event_id=body["event_id"], author_id=body["author_id"], kind=body["kind"],
                     created_at=int(time.time() * 1000), priority="medium",
                     payload=msgspec.json.encode(body["payload"]).decode())
    return len(msgspec.msgpack.encode(item))


def event(author: str, tag: str, **extra: Any) -> dict[str, Any]:
    return {"event_id": f"{tag}-{time.time_ns()}", "author_id": author, "kind": "post",
            "payload": PAYLOAD, **extra}


# --- graphs ------------------------------------------------------------------------------


def fanout_graph(authors: int, followers: int) -> Iterator[tuple[str, str]]:
    for a in range(authors):
        for f in range(followers):
            yield f"fp{f}", f"fa{a}"


def latency_graph(sizes: Sequence[int]) -> Iterator[tuple[str, str]]:
    for size in sizes:
        for f in range(size):
            yield f"lp{f}", f"la{size}"


# --- 2. fan-out throughput ---------------------------------------------------------------


async def bench_fanout(env: Env, rt: Runtime, workers: Sequence[int], events: int,
                       authors: int, followers: int, repeats: int,
                       ceiling: dict[str, Any] | None) -> dict[str, Any]:
    """Rows/s from the first post to the last acknowledgement, per worker-process count.

    Measured like the ceiling: an untimed warm-up round first (a quarter of the events, one
    worker), and every round starts from an empty inbox table once the machine is quiet
    (``settle``). Each worker count runs ``repeats`` rounds and reports their median. With a
    ``ceiling`` (the Cassandra section's result) its best pattern is measured again right
    before every round, so the ceiling and the fan-out are sampled alternately over the same
    minutes: a 2-core VM drifts by 10-20% from one minute to the next, more than the gap
    being measured. Returns ``{"rounds": [per worker count], "ceiling_again": [runs]}``."""

    store = rt.store
    assert isinstance(store, CassandraStore)
    ceiling_again: list[dict[str, Any]] = []

    async def round_s(count: int, n_events: int, tag: str) -> tuple[float, float | None]:
        """Seconds for one round, and how busy the machine was meanwhile (percent)."""
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        api = (["api", "--processes", "1"], env.process_env(rt.settings, port))
        worker_cmds = [(["worker", "--processes", "1", "--concurrency", "4"],
                        env.process_env(rt.settings))
                       for _ in range(count)]
        with processes([api, *worker_cmds]):
            await wait_http(f"{url}/healthz")
            await asyncio.sleep(1.0)  # workers connected
            bodies = [event(f"fa{i % authors}", f"{tag}-{i}") for i in range(n_events)]
            # Like every ceiling pattern: an empty table and a quiet machine to start from.
            await asyncio.to_thread(store.session.execute,
                                    f"TRUNCATE {store.keyspace}.inbox_by_user", timeout=120)
            quiet = await asyncio.to_thread(settle, 60.0)
            if not quiet["settled"]:
                log(f"fan-out round {tag}: the machine did not settle ({quiet})")
            cpu_before = machine_cpu()
            started = time.perf_counter()
            await post_events(url, bodies)
            await wait_drained(rt)
            return time.perf_counter() - started, busy_pct(cpu_before, machine_cpu())

    warmup = max(1, events // 4)
    seconds, _ = await round_s(1, warmup, "tw")
    log(f"fan-out warm-up (not reported): {warmup * (followers + 1) / seconds:,.0f} rows/s")
    rows = events * (followers + 1)
    results = []
    for count in workers:
        rates: list[float] = []
        busy: list[float] = []
        for attempt in range(repeats):
            if ceiling is not None:
                ceiling_again.append(await asyncio.to_thread(
                    ceilings.repeat_best, store.session, env.hosts, store.keyspace, ceiling))
            seconds, load = await round_s(count, events, f"tp{count}-{attempt}")
            rates.append(round(rows / seconds))
            if load is not None:
                busy.append(load)
            log(f"fan-out, {count} worker process(es), round {attempt + 1}: "
                f"{rows / seconds:,.0f} rows/s")
        results.append({"workers": count, "events": events, "rows": rows,
                        "rows_per_s": round(statistics.median(rates)), "rounds": rates,
                        "machine_busy_pct": round(statistics.median(busy), 1) if busy else None})
    return {"rounds": results, "ceiling_again": ceiling_again}


def fanout_ratios(fanout: dict[str, Any], ceiling: dict[str, Any]) -> dict[str, Any]:
    """The fan-out's medians against the ceiling's best pattern: its median over every time
    it ran without errors (the sweep, where it was the fastest pattern, and each run between
    fan-out rounds), and, strictest, its single fastest run of the whole benchmark."""
    best = ceiling["best"]["rows_per_s"]
    samples = [best, *(run["rows_per_s"] for run in fanout["ceiling_again"]
                       if run["errors"] == 0)]
    median, fastest = statistics.median(samples), max(samples)
    for row in fanout["rounds"]:
        row["ratio_to_ceiling"] = round(row["rows_per_s"] / median, 3)
        row["ratio_to_fastest_ceiling_run"] = round(row["rows_per_s"] / fastest, 3)
    return {"pattern": ceiling["best"]["pattern"], "runs": samples,
            "median_rows_per_s": round(median), "fastest_rows_per_s": round(fastest)}


# --- 3. delivery latency -----------------------------------------------------------------


async def last_followers(store: CassandraStore, author: str, sample: int = 8) -> list[str]:
    """The followers fan-out writes last: the tail of the last page, in paging order."""
    after: str | None = None
    page: list[str] = []
    while True:
        batch, after = await store.followers_page(author, after, FOLLOWER_PAGE)
        page = batch or page
        if after is None:
            return page[-sample:]


async def visible_everywhere(store: CassandraStore, users: Sequence[str], event_id: str) -> bool:
    inboxes = await asyncio.gather(*(store.read_inbox(u, None, 20) for u in users))
    return all(any(i.event_id == event_id for i in rows) for rows in inboxes)


async def bench_latency(rt: Runtime, url: str, sizes: Sequence[int], samples: int,
                        label: str) -> list[dict[str, Any]]:
    store = rt.store
    assert isinstance(store, CassandraStore)
    out = []
    for size in sizes:
        author = f"la{size}"
        targets = await last_followers(store, author)
        times = []
        for n in range(samples):
            body = event(author, f"lat-{label}-{size}-{n}")
            (accepted,) = await post_events(url, [body], concurrency=1)
            while True:
                if await visible_everywhere(store, targets, body["event_id"]):
                    break
                await asyncio.sleep(0.002)
            times.append((time.perf_counter() - accepted) * 1000)
            await asyncio.sleep(0.05)
        row = {"followers": size, "samples": samples,
               "p50_ms": round(percentile(sorted(times), 50), 1),
               "p99_ms": round(percentile(sorted(times), 99), 1),
               "max_ms": round(max(times), 1)}
        out.append(row)
        log(f"latency {label}, {size} followers: p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms")
    return out


# --- 4. strategies -----------------------------------------------------------------------

STRATEGIES = {"hybrid": THRESHOLD, "push": 10**9, "pull": 0}  # celebrity thresholds


def strategy_graph(mega: int, celebrities: int, celebrity_followers: int, readers: int,
                   normal_authors: int) -> Iterator[tuple[str, str]]:
    for f in range(mega):
        yield f"sm{f}", "mega"
    for c in range(celebrities):
        for f in range(celebrity_followers):
            yield f"sc{f}", f"celeb{c}"
    for group in (0, 3, 30):
        for r in range(readers):
            reader = f"r{group}-{r}"
            for c in range(group):
                yield reader, f"celeb{c}"
            for n in range(20):
                yield reader, f"na{(r + n) % normal_authors}"


async def consume(rt: Runtime) -> int:
    """Fan out everything queued, in this process; returns the inbox rows written."""
    rows = 0
    while (delivery := await rt.queue.claim("bench", 0.05)) is not None:
        task = delivery.envelope.task
        if isinstance(task, FanoutTask):
            rows += await fanout.fan_out(rt, task.event)
        else:
            await fanout.handle(rt, delivery.envelope)
        await rt.queue.ack(delivery)
    return rows


async def bench_strategies(env: Env, quick: bool) -> list[dict[str, Any]]:
    # The quick run scales the graph down tenfold, threshold included.
    base = THRESHOLD // 10 if quick else THRESHOLD
    mega = 20_000 if quick else 1_000_000
    celebrities, celeb_followers = 30, base
    readers, normal_authors = (20, 100) if quick else (50, 400)
    posts_per_author = 1 if quick else 3
    read_s = 2.0 if quick else 10.0
    results = []
    for name, full_threshold in STRATEGIES.items():
        threshold = base if name == "hybrid" else full_threshold
        keyspace = f"feedsvc_bench_{name}"
        await fresh_keyspace(env, keyspace)
        settings = env.settings(keyspace, f"bench-{name}", threshold)
        async with open_runtime(settings) as rt:
            assert isinstance(rt.store, CassandraStore)
            await clear_queue(rt)
            edges = await load_edges(rt.store, strategy_graph(
                mega, celebrities, celeb_followers, readers, normal_authors), threshold)
            log(f"strategy {name}: graph of {edges:,} edges loaded")
            posted = 0
            rows = 0
            for rnd in range(posts_per_author):
                for author in [f"celeb{c}" for c in range(celebrities)] + \
                        [f"na{n}" for n in range(normal_authors)]:
                    await intake.accept(rt, msgspec.json.encode(event(author, f"s{rnd}")))
                    posted += 1
                rows += await consume(rt)
            await intake.accept(rt, msgspec.json.encode(event("mega", "mega")))
            started = time.perf_counter()
            mega_rows = await consume(rt)
            mega_s = time.perf_counter() - started
            posted += 1
            rows += mega_rows
            read_ceiling = None
            if name == "push":
                # The raw read ceiling on these very inboxes: the driver alone reading the
                # readers' 51-row slices (what a push reader's page costs the store).
                log("raw read ceiling on the push readers' inboxes")
                read_ceiling = await asyncio.to_thread(
                    ceilings.cassandra_read_ceiling, env.hosts, keyspace,
                    users=[f"r{g}-{r}" for g in (0, 3, 30) for r in range(readers)],
                    duration_s=read_s)
            by_processes: dict[str, list[dict[str, Any]]] = {}
            for count in API_PROCESSES:
                by_processes[str(count)] = await read_groups(env, settings, readers, read_s,
                                                             count)
        row = {"strategy": name, "threshold": threshold, "events": posted,
               "rows_per_event": round(rows / posted, 1), "mega_followers": mega,
               "mega_rows": mega_rows, "mega_fanout_s": round(mega_s, 3),
               "reads": by_processes[str(API_PROCESSES[0])],
               "reads_by_processes": by_processes, "client": read_client()}
        if read_ceiling is not None:
            row["read_ceiling"] = read_ceiling
        results.append(row)
        log(f"strategy {name}: {row['rows_per_event']} rows/event, "
            f"{mega:,}-follower post in {mega_s:.2f}s, reads {by_processes}")
    return results


API_PROCESSES = (1, 2)  # `feedsvc api --processes N` for the strategies' reads
READ_CONNECTIONS = 16


def read_client() -> str:
    """wrk when it can be had (it leaves the cores to the server), else the Python client."""
    return "wrk" if wrk_binary() is not None else "httpload"


async def read_groups(env: Env, settings: Settings, readers: int, read_s: float,
                      api_processes: int) -> list[dict[str, Any]]:
    """``GET /v1/inbox?limit=50`` per reader group against ``feedsvc api --processes N``:
    an untimed warm-up (connections, and this run's caches), then ``read_s`` measured."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    client = read_client()
    reads = []
    with processes([(["api", "--processes", str(api_processes)],
                     env.process_env(settings, port))]):
        await wait_http(f"{url}/healthz")
        for group in (0, 3, 30):
            tokens = [issue_token(JWT_SECRET, f"r{group}-{r}", 3600) for r in range(readers)]
            requests = [("/v1/inbox?limit=50", {"Authorization": f"Bearer {t}"})
                        for t in tokens]
            if client == "wrk":
                await asyncio.to_thread(run_wrk, url, requests, connections=READ_CONNECTIONS,
                                        duration_s=1.0)
                result = await asyncio.to_thread(run_wrk, url, requests,
                                                 connections=READ_CONNECTIONS,
                                                 duration_s=read_s)
                row = {"rps": round(result["rps"]), "p50_ms": round(result["p50_ms"], 2),
                       "p99_ms": round(result["p99_ms"], 2), "errors": result["errors"]}
            else:
                plan = RequestPlan([("GET", f"{url}{path}", headers, None)
                                    for path, headers in requests])
                await asyncio.to_thread(run_load_in_process, plan,
                                        connections=READ_CONNECTIONS, duration_s=1.0)
                measured = await asyncio.to_thread(
                    run_load_in_process, plan, connections=READ_CONNECTIONS,
                    duration_s=read_s)
                row = {"rps": round(measured.rps), "p50_ms": round(measured.p50_ms, 2),
                       "p99_ms": round(measured.p99_ms, 2), "errors": measured.errors}
            reads.append({"celebrities": group, **row})
            log(f"reads, {api_processes} API process(es), {group} celebrities: {row}")
    return reads


def read_ratios(strategies: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets as ratios, per API process count: hybrid against push (req/s and
    p99) for readers of 3 and 30 celebrities, push readers against the raw read ceiling,
    and 2 API processes against 1."""
    by = {s["strategy"]: s for s in strategies}
    out: dict[str, Any] = {}

    def reads(strategy: str, count: str) -> dict[int, dict[str, Any]]:
        return {r["celebrities"]: r for r in by[strategy]["reads_by_processes"][count]}

    counts = [str(c) for c in API_PROCESSES]
    if "hybrid" in by and "push" in by:
        for count in counts:
            hybrid, push = reads("hybrid", count), reads("push", count)
            for group in (3, 30):
                out[f"hybrid_rps_over_push_{group}c_{count}p"] = round(
                    hybrid[group]["rps"] / max(1, push[group]["rps"]), 3)
                out[f"hybrid_p99_over_push_{group}c_{count}p"] = round(
                    hybrid[group]["p99_ms"] / max(0.01, push[group]["p99_ms"]), 3)
    if "push" in by and "read_ceiling" in by["push"]:
        ceiling = by["push"]["read_ceiling"]["best"]["queries_per_s"]
        best = max(reads("push", c)[0]["rps"] for c in counts)
        out["push_rps_over_read_ceiling"] = round(best / max(1.0, ceiling), 3)
        for count in counts:
            out[f"push_rps_over_read_ceiling_{count}p"] = round(
                reads("push", count)[0]["rps"] / max(1.0, ceiling), 3)
    if len(counts) == 2:
        for strategy in by:
            for group in (0, 3, 30):
                one = reads(strategy, counts[0])[group]["rps"]
                out[f"{strategy}_{group}c_processes_{counts[1]}_over_{counts[0]}"] = round(
                    reads(strategy, counts[1])[group]["rps"] / max(1, one), 3)
    return out


# --- 5. locust ---------------------------------------------------------------------------


def run_locust(url: str, out: Path, users: int, graph_users: int, duration_s: int
               ) -> dict[str, Any]:
    prefix = out / "locust"
    env = dict(os.environ, FEEDSVC_LOAD_USERS=str(graph_users), FEEDSVC_SERVICE_KEY=SERVICE_KEY,
               FEEDSVC_JWT_SECRET=JWT_SECRET)
    subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"),
         "--headless", "-u", str(users), "-r", str(max(1, users // 4)), "-t", f"{duration_s}s",
         "--host", url, "--csv", str(prefix), "--only-summary", "--loglevel", "WARNING",
         "--stop-timeout", "5"],
        env=env, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        timeout=duration_s + 120,
    )
    return parse_locust(prefix.with_name("locust_stats.csv"), duration_s, users)


def parse_locust(path: Path, duration_s: int, users: int) -> dict[str, Any]:
    import csv

    endpoints = []
    total: dict[str, Any] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            entry = {"name": row["Name"], "requests": int(row["Request Count"]),
                     "failures": int(row["Failure Count"]),
                     "rps": round(float(row["Requests/s"]), 1),
                     "p50_ms": float(row["50%"]), "p95_ms": float(row["95%"]),
                     "p99_ms": float(row["99%"])}
            if row["Name"] == "Aggregated":
                total = entry
            else:
                endpoints.append(entry)
    return {"users": users, "duration_s": duration_s, "endpoints": endpoints, "total": total}


# --- the run -----------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_gib, 1),
            "python": platform.python_version(), "platform": platform.platform()}


SECTIONS = ("ceilings", "fanout", "latency", "locust", "strategies")


async def run(env: Env, quick: bool, out: Path, sections: set[str]) -> dict[str, Any]:
    started = time.perf_counter()
    result: dict[str, Any] = {"quick": quick, "machine": machine(),
                              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    keyspace = "feedsvc_bench"
    await fresh_keyspace(env, keyspace)
    fanout_events = 20 if quick else FANOUT_EVENTS

    if "ceilings" in sections:
        log("ceilings")
        # Rows shaped like the fan-out section's: the same item size, the same number of
        # inboxes (followers + the author) and the same number of rows.
        result["ceilings"] = {
            "cassandra": await asyncio.to_thread(
                ceilings.cassandra_insert_ceiling, env.hosts, keyspace,
                rows=fanout_events * (FANOUT_FOLLOWERS + 1), payload_bytes=inbox_item_bytes(),
                partitions=FANOUT_FOLLOWERS + 1, processes=(1, 2), single=not quick,
                batch_sizes=(64,) if quick else ceilings.BATCH_SIZES),
            "redis": await asyncio.to_thread(
                ceilings.redis_ceilings, int(env.redis_url.rsplit(":", 1)[1].split("/")[0]),
                50_000 if quick else 200_000),
            "aiohttp_noop": await asyncio.to_thread(
                ceilings.aiohttp_noop_ceiling, 16, 3.0 if quick else 10.0),
        }
        if wrk_binary() is not None:
            result["ceilings"]["aiohttp_noop_wrk"] = await asyncio.to_thread(
                ceilings.aiohttp_noop_wrk_ceiling, 16, 3.0 if quick else 10.0)
        result["ceilings"]["cassandra_read"] = await asyncio.to_thread(
            ceilings.cassandra_read_ceiling, env.hosts, keyspace,
            duration_s=3.0 if quick else 10.0)

    settings = env.settings(keyspace, "bench")
    async with open_runtime(settings) as rt:
        assert isinstance(rt.store, CassandraStore)
        await clear_queue(rt)
        authors, followers = FANOUT_AUTHORS, FANOUT_FOLLOWERS
        sizes = (10, 1_000, 9_999)
        graph_users = 20_000 if quick else 100_000
        log("loading graphs")
        await load_edges(rt.store, fanout_graph(authors, followers), THRESHOLD)
        await load_edges(rt.store, latency_graph(sizes), THRESHOLD)

        if "fanout" in sections:
            log("fan-out throughput")
            ceiling = result["ceilings"]["cassandra"] if "ceilings" in result else None
            result["fanout"] = await bench_fanout(
                env, rt, (1, 2) if quick else (1, 2, 4), fanout_events, authors, followers,
                1 if quick else FANOUT_REPEATS, ceiling)
            if ceiling is not None:
                result["fanout"]["ceiling"] = fanout_ratios(result["fanout"], ceiling)

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        commands = [(["api", "--processes", "1"], env.process_env(settings, port)),
                    (["worker", "--processes", "1", "--concurrency", "4"],
                     env.process_env(settings))]
        samples = 5 if quick else 30
        with processes(commands):
            await wait_http(f"{url}/healthz")
            if "latency" in sections:
                log("delivery latency, idle")
                result["latency"] = {
                    "idle": await bench_latency(rt, url, sizes, samples, "idle")}
            if "locust" in sections:
                # Loaded only now: compacting 1.7 M fresh edges must not run under the
                # fan-out and idle-latency measurements.
                edges = await load_edges(rt.store, follow_pairs(graph_users, 20, 1.0, 1),
                                         THRESHOLD)
                log(f"power-law graph: {graph_users:,} users, {edges:,} follows")
                log("locust mixed workload (delivery latency measured under it)")
                duration = 20 if quick else 60
                locust = asyncio.create_task(asyncio.to_thread(
                    run_locust, url, out, 32, graph_users, duration))
                if "latency" in sections:
                    await asyncio.sleep(10)
                    result["latency"]["loaded"] = await bench_latency(
                        rt, url, sizes, max(5, samples // 3), "loaded")
                result["locust"] = await locust

    if "strategies" in sections:
        log("strategies")
        result["strategies"] = await bench_strategies(env, quick)
        result["read_ratios"] = read_ratios(result["strategies"])
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="the subset (under 3 minutes)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run these sections only")
    parser.add_argument("--out", type=Path, default=ROOT / "loadtest" / "results")
    args = parser.parse_args(argv)
    hosts = os.environ.get("FEEDSVC_CASSANDRA_HOSTS")
    redis_url = os.environ.get("FEEDSVC_REDIS_URL")
    if not hosts or not redis_url:
        print("set FEEDSVC_CASSANDRA_HOSTS and FEEDSVC_REDIS_URL (make bench does)",
              file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    env = Env(tuple(hosts.split(",")), redis_url)
    sections = set(args.only or SECTIONS)
    if args.quick and not args.only:
        sections.discard("locust")
    result = asyncio.run(run(env, args.quick, args.out, sections))
    name = "bench-quick" if args.quick else ("bench" if not args.only else
                                             "bench-" + "-".join(sorted(sections)))
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2))
    table = write_report(result, args.out, name)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
