"""``make chaos`` (delivery): notifications to 2,000 recipients while providers fail and
workers die, then an exact count at the fake providers.

One API and two worker processes (4 consumers each) run against the local Cassandra and
Redis with every provider pointed at the local fakes (``tests/fakes``), which fail a share
of calls with 503 and 429 (with ``Retry-After``) and hang others past the client timeout.
2,000 followers of one author register one to three devices (FCM, APNs, Web Push), a phone
and an address; some turn a channel off, or push off for one kind of event. Two events
that notify on every channel are posted; a worker is SIGKILLed and restarted five times
while the deliveries go out.

The check reads the fakes' ledgers, which count accepted requests per ``Idempotency-Key``
(the delivery key): every delivery the preferences allow must be accepted once, and none
they forbid may be. The raw number of requests repeating an already accepted key is
printed: the provider de-duplicated them, so they are not second deliveries, but each is a
send that our send-once left to the provider (a worker killed between the provider's
answer and marking the key sent); expected no more than the deliveries in flight at the
kills.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from feedsvc.client import FeedClient
from feedsvc.delivery.recipients import (
    ChannelSwitches,
    ContactsIn,
    DeviceIn,
    KindSwitches,
    Platform,
    PreferencesIn,
    WebPushKeys,
    WebPushSubscription,
)
from feedsvc.model import EventIn, MessageIn, NotifyIn
from loadtest.bench import SERVICE_KEY, Env, fresh_keyspace, wait_http
from loadtest.ceilings import free_port
from loadtest.chaos import RESULTS, Fleet, log
from tests.fakes.suite import Fakes, running_fakes

RECIPIENTS = 2_000
WORKERS = 2
KILLS = 5
DEADLINE_S = 1200.0
KINDS = ("alert", "news")
PLATFORMS: tuple[Platform, ...] = ("fcm", "apns", "webpush")
PROVIDER_TIMEOUT_S = 3.0  # a hung provider call holds a consumer this long


@dataclass(frozen=True)
class Recipient:
    user_id: str
    devices: dict[str, Platform]  # device_id -> platform
    sms_off: bool
    email_off: bool
    news_push_off: bool


@dataclass
class Outcome:
    expected: set[str] = field(default_factory=set)
    forbidden: set[str] = field(default_factory=set)


def plan(tag: str, count: int, rng: random.Random) -> list[Recipient]:
    people = []
    for i in range(count):
        platforms = rng.choices(PLATFORMS, weights=(5, 3, 2),
                                k=rng.randint(1, 3))
        people.append(Recipient(
            f"{tag}-u{i}", {f"d{n}": p for n, p in enumerate(platforms)},
            sms_off=rng.random() < 0.1, email_off=rng.random() < 0.05,
            news_push_off=rng.random() < 0.1))
    return people


def expectation(people: Sequence[Recipient], events: dict[str, str]) -> Outcome:
    """The delivery keys the preferences allow and those they forbid, per event id -> kind."""
    out = Outcome()
    for event_id, kind in events.items():
        for p in people:
            nid = f"{event_id}:{p.user_id}"
            push = {f"{nid}:push:{d}" for d in p.devices}
            (out.forbidden if kind == "news" and p.news_push_off else out.expected).update(push)
            (out.forbidden if p.sms_off else out.expected).add(f"{nid}:sms:sms")
            (out.forbidden if p.email_off else out.expected).add(f"{nid}:email:email")
    return out


async def seed(client: FeedClient, author: str, people: Sequence[Recipient],
               fakes: Fakes) -> None:
    """Devices, contacts, preferences and follows, through the API (the typed client
    retries 503 and 429 as any client would)."""
    calls: list[Awaitable[object]] = []
    for n, p in enumerate(people):
        for device_id, platform in p.devices.items():
            if platform == "webpush":
                sub = fakes.webpush.subscribe()
                device = DeviceIn("webpush", subscription=WebPushSubscription(
                    sub.endpoint, WebPushKeys(sub.p256dh, sub.auth_b64)))
            else:
                device = DeviceIn(platform, token=f"tok-{p.user_id}-{device_id}")
            calls.append(client.put_device(p.user_id, device_id, device))
        calls.append(client.put_contacts(p.user_id, ContactsIn(
            f"{p.user_id}@example.com", f"+1415{n:07d}")))
        if p.sms_off or p.email_off or p.news_push_off:
            calls.append(client.put_preferences(p.user_id, PreferencesIn(
                channels=ChannelSwitches(sms=not p.sms_off, email=not p.email_off),
                kinds={"news": KindSwitches(push=False)} if p.news_push_off else None)))
    await client.follow_bulk((p.user_id, author) for p in people)
    pending = iter(calls)

    async def lane() -> None:
        for call in pending:
            await call

    await asyncio.gather(*(lane() for _ in range(16)))


def accepted(fakes: Fakes) -> dict[str, int]:
    """Accepted keys over every fake (a key accepted by two fakes would count 2)."""
    counts: dict[str, int] = {}
    for ledger in fakes.ledgers().values():
        for key in ledger.stats(keys=True)["accepted_keys"]:
            counts[key] = counts.get(key, 0) + 1
    return counts


async def kill_workers(fleet: Fleet, rng: random.Random, kills: int) -> list[float]:
    """SIGKILL a random worker ``kills`` times while deliveries go out; restart each."""
    at = []
    started = time.monotonic()
    for _ in range(kills):
        await asyncio.sleep(rng.uniform(1.5, 4.0))
        fleet.kill_worker()
        at.append(round(time.monotonic() - started, 1))
        fleet.start_worker()
    return at


async def run(env: Env, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    tag = f"cd{int(time.time()) % 100000}"
    keyspace = f"chaosd_{int(time.time())}"
    await fresh_keyspace(env, keyspace)
    log_dir = RESULTS / f"chaos-delivery-{time.strftime('%Y%m%d-%H%M%S')}"
    log_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        async with running_fakes(Path(scratch)) as fakes:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            proc_env = env.process_env(env.settings(keyspace, tag), port)
            proc_env.update({f"FEEDSVC_{name.upper()}": str(value)
                             for name, value in fakes.settings().items()})
            proc_env["FEEDSVC_PROVIDER_TIMEOUT"] = str(PROVIDER_TIMEOUT_S)
            fleet = Fleet(proc_env, port, log_dir)
            fleet.start_api()
            for _ in range(WORKERS):
                fleet.start_worker()
            client = FeedClient(url, credential=SERVICE_KEY)
            try:
                await wait_http(f"{url}/readyz")
                author = f"{tag}-author"
                people = plan(tag, args.recipients, rng)
                seeding = time.monotonic()
                await seed(client, author, people, fakes)
                log(f"seeded {len(people)} recipients in {time.monotonic() - seeding:.1f} s")
                fakes.set_behaviour(error_rate=args.error_rate, timeout_rate=args.hang_rate,
                                    hang=PROVIDER_TIMEOUT_S + 2, retry_after=1,
                                    seed=args.seed)
                events = {f"{tag}-e-{kind}": kind for kind in KINDS}
                want = expectation(people, events)
                log(f"posting {len(events)} events: {len(want.expected)} deliveries allowed, "
                    f"{len(want.forbidden)} forbidden")
                posted = time.monotonic()
                for event_id, kind in events.items():
                    await client.post_event(EventIn(
                        event_id=event_id, author_id=author, kind=kind, payload={},
                        notify=NotifyIn(channels=["push", "sms", "email"],
                                        message=MessageIn(kind, "chaos"))))
                kills = await kill_workers(fleet, rng, args.kills)
                progress = 0
                while True:
                    got = accepted(fakes)
                    missing = want.expected - set(got)
                    if not missing or time.monotonic() - posted > args.deadline:
                        break
                    if len(got) // 1000 != progress:
                        progress = len(got) // 1000
                        log(f"{len(got)} of {len(want.expected)} accepted after "
                            f"{time.monotonic() - posted:.0f} s")
                    await asyncio.sleep(2.0)
                elapsed = time.monotonic() - posted
                await asyncio.sleep(5.0)  # anything still in flight would land now
                got = accepted(fakes)
                exited = fleet.exited()
            finally:
                await client.aclose()
                fleet.stop()
            stats = {name: ledger.stats() for name, ledger in fakes.ledgers().items()}
    row = {
        "recipients": len(people), "allowed": len(want.expected),
        "delivered_once": sum(1 for k in want.expected if got.get(k) == 1),
        "missing": len(want.expected - set(got)),
        "missing_by_channel": dict(Counter(k.rsplit(":", 2)[1] for k in
                                           want.expected - set(got))),
        "forbidden_sent": len(want.forbidden & set(got)),
        "unknown_sent": len(set(got) - want.expected - want.forbidden),
        "repeated_requests": sum(s["repeats"] for s in stats.values()),
        "provider_requests": sum(s["requests"] for s in stats.values()),
        "injected_failures": sum(sum(s["failures"].values()) for s in stats.values()),
        "kills_at_s": kills, "seconds": round(elapsed, 1), "exited": exited,
    }
    log(json.dumps(row))
    (log_dir / "result.json").write_text(json.dumps({**row, "providers": stats}, indent=2))
    return row


def table(row: dict[str, Any]) -> str:
    return "\n".join([
        "| recipients | deliveries allowed | delivered exactly once | missing | forbidden sent "
        "| repeated requests (de-duplicated by the fake) | provider requests | injected "
        "failures | worker kills | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {row['recipients']} | {row['allowed']} | {row['delivered_once']} | {row['missing']} "
        f"| {row['forbidden_sent'] + row['unknown_sent']} | {row['repeated_requests']} "
        f"| {row['provider_requests']} | {row['injected_failures']} | {len(row['kills_at_s'])} "
        f"| {row['seconds']} |"])


def main(argv: Sequence[str] | None = None) -> int:
    import os

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipients", type=int, default=RECIPIENTS)
    parser.add_argument("--error-rate", type=float, default=0.15,
                        help="share of provider calls answered 503/429 (SMTP: 451)")
    parser.add_argument("--hang-rate", type=float, default=0.05,
                        help="share of provider calls that hang past the client timeout")
    parser.add_argument("--kills", type=int, default=KILLS, help="worker SIGKILLs")
    parser.add_argument("--deadline", type=float, default=DEADLINE_S,
                        help="seconds to wait for every delivery")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    env = Env(tuple(os.environ["FEEDSVC_CASSANDRA_HOSTS"].split(",")),
              os.environ["FEEDSVC_REDIS_URL"])
    row = asyncio.run(run(env, args))
    print(table(row))
    ok = (row["missing"] == 0 and row["forbidden_sent"] == 0 and row["unknown_sent"] == 0
          and row["delivered_once"] == row["allowed"] and not row["exited"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
