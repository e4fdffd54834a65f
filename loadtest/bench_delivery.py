"""``make bench`` (delivery): deliveries per second end to end against the fake FCM's ceiling,
and how long a notify to a very large audience takes to queue.

1. **Ceiling.** The fake FCM runs as its own process; a bare aiohttp client sends it the
   same ``messages:send`` requests with as many in flight as the workers have consumers
   (``loadtest/fake_ceiling.py``). Measured again before each end-to-end round, so both are
   sampled over the same minutes.
2. **End to end.** 10,000 followers of one author, each with one to three FCM devices
   (loaded straight into Cassandra, outside any timing). One API and 1 then 2 worker
   processes (``--concurrency`` + ``--senders`` consumers each); one ``POST /v1/events`` with
   ``notify: {"channels": ["push"]}``; the clock runs from its 202 until the fake has
   accepted every device's message. Deliveries per second, and that ÷ the ceiling.
3. **Enqueue.** A notify to an author with ``--audience`` followers (1,000,000 by default)
   and a worker that runs only the fan-out queue: seconds until every recipient's channel
   task is on the push stream (the notify fan-out pages the audience 1,000 at a time and
   reads each recipient's preferences).

Prints one JSON document (and writes it under loadtest/results/) with the seed arithmetic:
at the measured rate per worker process, the hours 150 million deliveries take and the
worker processes 100,000 deliveries/s need.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from feedsvc.delivery.recipients import Device
from feedsvc.runtime import Runtime, open_runtime
from feedsvc.store.cassandra import CassandraStore
from feedsvc.store.recipients_cassandra import CassandraRecipients
from loadtest.bench import SERVICE_KEY, Env, fresh_keyspace, processes, wait_http
from loadtest.ceilings import free_port
from loadtest.fake_ceiling import fetch_access_token, measure_fcm_ceiling, run_fake_fcm
from loadtest.graphload import load_edges

RESULTS = Path(__file__).resolve().parent / "results"
PROJECT = "fake-project"  # the fake FCM's default project
THRESHOLD = 1_000_000_000  # every author pushes; notify ignores reach anyway


def log(message: str) -> None:
    print(f"[bench-delivery {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr,
          flush=True)


def fake_accepted(url: str) -> int:
    with urllib.request.urlopen(f"{url.rstrip('/')}/_fake/stats", timeout=10) as response:
        return int(json.load(response)["accepted"])


async def seed_devices(rt: Runtime, users: Sequence[str], rng: random.Random) -> int:
    """One to three FCM devices per user; returns how many."""
    recipients = rt.recipients
    assert isinstance(recipients, CassandraRecipients)
    limit = asyncio.Semaphore(64)
    total = 0

    async def put(user: str) -> None:
        nonlocal total
        for d in range(rng.randint(1, 3)):
            total += 1
            async with limit:
                await recipients.put_device(user, Device(
                    f"d{d}", "fcm", token=f"tok-{user}-{d}"))

    await asyncio.gather(*(put(u) for u in users))
    return total


async def post_notify(url: str, event_id: str, author: str) -> None:
    async with aiohttp.ClientSession() as session, session.post(
            f"{url}/v1/events", headers={"Authorization": f"Bearer {SERVICE_KEY}"}, json={
                "event_id": event_id, "author_id": author, "kind": "bench", "payload": {},
                "notify": {"channels": ["push"],
                           "message": {"title": "Bench", "body": "hello"}}}) as response:
        if response.status != 202:
            raise RuntimeError(f"POST /v1/events: {response.status} {await response.text()}")


async def end_to_end(env: Env, rt: Runtime, fcm: str, credentials: Path, token: str,
                     author: str, devices: int, worker_counts: Sequence[int],
                     concurrency: int, senders: int) -> list[dict[str, Any]]:
    rows = []
    for count in worker_counts:
        in_flight = count * (concurrency + senders)
        ceiling = await measure_fcm_ceiling(fcm, PROJECT, token, requests=min(devices, 10_000),
                                            concurrency=in_flight)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc_env = env.process_env(rt.settings, port)
        proc_env.update({"FEEDSVC_FCM_PROJECT_ID": PROJECT, "FEEDSVC_FCM_URL": fcm,
                         "FEEDSVC_FCM_CREDENTIALS": str(credentials)})
        workers = [(["worker", "--processes", "1", "--concurrency", str(concurrency),
                     "--senders", str(senders)], proc_env)
                   for _ in range(count)]
        with processes([(["api", "--processes", "1"], proc_env), *workers]):
            await wait_http(f"{url}/readyz")
            await asyncio.sleep(2.0)  # workers connected
            before = fake_accepted(fcm)
            started = time.monotonic()
            await post_notify(url, f"bench-{count}w-{int(time.time())}", author)
            while (sent := fake_accepted(fcm) - before) < devices:
                if time.monotonic() - started > 1_800:
                    raise TimeoutError(f"{sent} of {devices} deliveries after 30 minutes")
                await asyncio.sleep(0.1)
            seconds = time.monotonic() - started
        rate = devices / seconds
        row = {"worker_processes": count, "consumers_per_process": concurrency + senders,
               "deliveries": devices, "seconds": round(seconds, 1),
               "deliveries_per_s": round(rate), "ceiling_per_s": round(ceiling.per_second),
               "ceiling_concurrency": in_flight, "ratio": round(rate / ceiling.per_second, 2)}
        log(json.dumps(row))
        rows.append(row)
    return rows


async def enqueue_time(env: Env, rt: Runtime, audience: int) -> dict[str, Any]:
    """Seconds from the 202 of a notify to ``audience`` followers until every channel task
    is queued (a worker on the fan-out queue only, so none is consumed)."""
    store = rt.store
    assert isinstance(store, CassandraStore)
    author = f"bd-mega-{audience}"
    loading = time.monotonic()
    await load_edges(store, ((f"bm{i}", author) for i in range(audience)), THRESHOLD)
    log(f"loaded {audience} followers in {time.monotonic() - loading:.0f} s")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc_env = env.process_env(rt.settings, port)
    with processes([(["api", "--processes", "1"], proc_env),
                    (["worker", "--processes", "1", "--queues", "fanout", "--concurrency", "4",
                      "--senders", "0"], proc_env)]):
        await wait_http(f"{url}/readyz")
        await asyncio.sleep(2.0)
        before = (await rt.queue.stats()).queued.get("push", 0)
        started = time.monotonic()
        await post_notify(url, f"bench-mega-{int(time.time())}", author)
        while (queued := (await rt.queue.stats()).queued.get("push", 0) - before) < audience:
            if time.monotonic() - started > 3_600:
                raise TimeoutError(f"{queued} of {audience} queued after an hour")
            await asyncio.sleep(1.0)
        seconds = time.monotonic() - started
    row = {"audience": audience, "seconds": round(seconds, 1),
           "recipients_per_s": round(audience / seconds)}
    log(json.dumps(row))
    return row


def arithmetic(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """150 million deliveries and 100,000 deliveries/s at the best measured rate per process."""
    per_process = max(r["deliveries_per_s"] / r["worker_processes"] for r in rows)
    return {"per_worker_process_per_s": round(per_process),
            "hours_for_150M_one_process": round(150e6 / per_process / 3600, 1),
            "processes_for_100k_per_s": math.ceil(100_000 / per_process)}


async def run(env: Env, args: argparse.Namespace) -> dict[str, Any]:
    keyspace = f"benchd_{int(time.time())}"
    await fresh_keyspace(env, keyspace)
    settings = env.settings(keyspace, f"bd{int(time.time()) % 100000}", THRESHOLD)
    out: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count()}
    async with open_runtime(settings) as rt:
        store = rt.store
        assert isinstance(store, CassandraStore)
        author = "bd-author"
        users = [f"bf{i}" for i in range(args.followers)]
        await load_edges(store, ((u, author) for u in users), THRESHOLD)
        devices = await seed_devices(rt, users, random.Random(11))
        log(f"{len(users)} followers with {devices} FCM devices")
        with tempfile.TemporaryDirectory() as scratch:
            credentials = Path(scratch) / "fcm.json"
            with run_fake_fcm(credentials) as fcm:
                token = await fetch_access_token(credentials)
                out["end_to_end"] = await end_to_end(
                    env, rt, fcm, credentials, token, author, devices,
                    [int(n) for n in args.workers.split(",")], args.concurrency,
                    args.senders)
        out["seed_arithmetic"] = arithmetic(out["end_to_end"])
        if args.audience:
            out["enqueue"] = await enqueue_time(env, rt, args.audience)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--followers", type=int, default=10_000)
    parser.add_argument("--workers", default="1,2", help="worker process counts, in order")
    parser.add_argument("--concurrency", type=int, default=4, help="consumers per worker")
    parser.add_argument("--senders", type=int, default=16, help="channel-only consumers per worker")
    parser.add_argument("--audience", type=int, default=1_000_000,
                        help="followers of the enqueue-time author (0: skip that part)")
    args = parser.parse_args(argv)
    env = Env(tuple(os.environ["FEEDSVC_CASSANDRA_HOSTS"].split(",")),
              os.environ["FEEDSVC_REDIS_URL"])
    result = asyncio.run(run(env, args))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"bench-delivery-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
