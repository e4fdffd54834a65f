"""``make chaos`` (delivery): notifications to 2,000 recipients while providers fail and
workers die, then an exact count at the fake providers.

One API and two worker processes (4 consumers each) run against the local Cassandra and
Redis with every provider pointed at the local fakes (``tests/fakes``), which fail a share
of calls with 503 and 429 (with ``Retry-After``) and hang others past the client timeout.
2,000 followers of one author register one to three devices (FCM, APNs, Web Push), a phone
and an address; some turn a channel off, or push off for one kind of event. Two events
that notify on every channel are posted; a worker is SIGKILLed and restarted five times
while the deliveries go out.

Delivery policy is in play at the same time (issue: delivery policy). A second group
follows another author who posts eight push-only events: with ``FEEDSVC_NOTIFY_RATE`` at
``push=3/30s`` most of them are held and rolled into digests, and the check is that each
device got every event exactly once, either on its own or counted in a digest (the digest's
"N new notifications" title). A third group gets a push that escalates to SMS after 40 s:
half of them report it opened at once (with their own user token) and must get no SMS, the
other half must get exactly one. And FCM fails every call for 20 s after the posts, so its
circuit breaker opens (cool-down 5 s) and what waited behind it goes out after recovery;
the breaker transitions the workers logged are counted.

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
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from feedsvc.auth import issue_token
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
from feedsvc.model import EscalateIn, EventIn, MessageIn, NotifyIn
from loadtest.bench import JWT_SECRET, SERVICE_KEY, Env, fresh_keyspace, wait_http
from loadtest.ceilings import free_port
from loadtest.chaos import RESULTS, Fleet, log
from tests.fakes.ledger import Behaviour
from tests.fakes.suite import Fakes, running_fakes

RECIPIENTS = 2_000
WORKERS = 2
KILLS = 5
DEADLINE_S = 1200.0
KINDS = ("alert", "news")
PLATFORMS: tuple[Platform, ...] = ("fcm", "apns", "webpush")
PROVIDER_TIMEOUT_S = 3.0  # a hung provider call holds a consumer this long
# Policy in play: the digest group, the escalation group, and an FCM outage.
DIGEST_RECIPIENTS = 300
DIGEST_EVENTS = 8
NOTIFY_RATE = "push=3/30s"  # 8 events a device, so most are held for the window's digest
ESCALATION_RECIPIENTS = 300
ESCALATE_AFTER_S = 40
BREAKER_COOLDOWN = "5s"
OUTAGE_AFTER_S = 5.0  # after the posts, FCM fails every call for OUTAGE_S
OUTAGE_S = 20.0
_DIGEST_TITLE = re.compile(r"^([0-9]+) new notifications?$")


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


def plan(tag: str, count: int, rng: random.Random, *,
         platforms: Sequence[Platform] = PLATFORMS, weights: Sequence[int] = (5, 3, 2),
         most: int = 3, switches: bool = True) -> list[Recipient]:
    """``count`` recipients with one to ``most`` devices; with ``switches`` some turn a
    channel off, or push off for news."""
    people = []
    for i in range(count):
        chosen = rng.choices(platforms, weights=weights, k=rng.randint(1, most))
        people.append(Recipient(
            f"{tag}{i}", {f"d{n}": p for n, p in enumerate(chosen)},
            sms_off=switches and rng.random() < 0.1,
            email_off=switches and rng.random() < 0.05,
            news_push_off=switches and rng.random() < 0.1))
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


def escalation_expectation(people: Sequence[Recipient], event_id: str, out: Outcome) -> None:
    """Every push once; the SMS escalation for the odd half (who never open it), none for
    the even half (who report it opened at once)."""
    for i, p in enumerate(people):
        nid = f"{event_id}:{p.user_id}"
        out.expected.update(f"{nid}:push:{d}" for d in p.devices)
        (out.expected if i % 2 else out.forbidden).add(f"{nid}:sms:sms")


def key_user(key: str) -> str:
    """The recipient of a delivery key: ``event:user:channel:target``, where a digest's
    event id is ``digest:channel:window``."""
    parts = key.split(":")
    return parts[3] if parts[0] == "digest" else parts[1]


@dataclass
class DigestTally:
    devices: int = 0
    direct: int = 0  # events sent on their own
    digests: int = 0
    held: int = 0  # events counted in the digests' titles
    short: int = 0  # devices that got fewer than every event (so far)
    over: int = 0  # devices that got an event twice (on its own and in a digest, or ...)
    unreadable: int = 0  # digests whose title is not "N new notifications"


def digest_tally(records: dict[str, dict[str, Any]], people: Sequence[Recipient],
                 events: Sequence[str]) -> DigestTally:
    """Per device of the digest group: the events it got on their own plus those counted
    in its digests must be exactly every event."""
    users = {p.user_id for p in people}
    wanted = set(events)
    got: Counter[tuple[str, str]] = Counter()
    tally = DigestTally(devices=sum(len(p.devices) for p in people))
    for key, record in records.items():
        parts = key.split(":")
        if key_user(key) not in users:
            continue
        if parts[0] == "digest":
            match = _DIGEST_TITLE.fullmatch(str(record.get("title", "")))
            if match is None:
                tally.unreadable += 1
                continue
            tally.digests += 1
            tally.held += int(match.group(1))
            got[parts[3], parts[5]] += int(match.group(1))
        elif parts[0] in wanted:
            tally.direct += 1
            got[parts[1], parts[3]] += 1
    for p in people:
        for device in p.devices:
            count = got[p.user_id, device]
            tally.short += count < len(events)
            tally.over += count > len(events)
    return tally


async def open_half(url: str, people: Sequence[Recipient], event_id: str) -> None:
    """The even half report the notification opened, each with its own user token."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        async def one(p: Recipient) -> None:
            client = FeedClient(url, credential=issue_token(JWT_SECRET, p.user_id, 3600),
                                session=session)
            await client.opened(f"{event_id}:{p.user_id}")

        await asyncio.gather(*(one(p) for p in people[::2]))


async def outage(fakes: Fakes, restore: Behaviour, after_s: float, seconds: float) -> None:
    """FCM answers every call 503 for ``seconds``, then misbehaves as before."""
    await asyncio.sleep(after_s)
    fakes.fcm.behaviour = Behaviour(error_rate=1.0, error_statuses=(503,), retry_after=1)
    log(f"FCM outage for {seconds:.0f} s")
    await asyncio.sleep(seconds)
    fakes.fcm.behaviour = restore
    log("FCM is back")


def breaker_transitions(log_dir: Path) -> Counter[str]:
    """``closed -> open`` and the like, as the workers logged them."""
    found: Counter[str] = Counter()
    for path in log_dir.glob("worker*.log"):
        for line in path.read_text(errors="replace").splitlines():
            match = re.search(r"provider (\w+) breaker: (\w+) -> (\w+)", line)
            if match:
                found[f"{match.group(1)} {match.group(2)}->{match.group(3)}"] += 1
    return found


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
            proc_env["FEEDSVC_NOTIFY_RATE"] = NOTIFY_RATE
            proc_env["FEEDSVC_BREAKER_COOLDOWN"] = BREAKER_COOLDOWN
            fleet = Fleet(proc_env, port, log_dir)
            fleet.start_api()
            for _ in range(WORKERS):
                fleet.start_worker()
            client = FeedClient(url, credential=SERVICE_KEY)
            try:
                await wait_http(f"{url}/readyz")
                author = f"{tag}-author"
                people = plan(f"{tag}-u", args.recipients, rng)
                digesters = plan(f"{tag}-g", args.digest_recipients, rng, platforms=("fcm",),
                                 weights=(1,), most=2, switches=False)
                escalated = plan(f"{tag}-x", args.escalation_recipients, rng,
                                 platforms=("fcm", "apns"), weights=(1, 1), most=1,
                                 switches=False)
                seeding = time.monotonic()
                await seed(client, author, people, fakes)
                await seed(client, f"{tag}-digest-author", digesters, fakes)
                await seed(client, f"{tag}-escalating-author", escalated, fakes)
                log(f"seeded {len(people)} + {len(digesters)} + {len(escalated)} recipients in "
                    f"{time.monotonic() - seeding:.1f} s")
                chaos = dict(error_rate=args.error_rate, timeout_rate=args.hang_rate,
                             hang=PROVIDER_TIMEOUT_S + 2, retry_after=1, seed=args.seed)
                fakes.set_behaviour(**chaos)
                events = {f"{tag}-e-{kind}": kind for kind in KINDS}
                want = expectation(people, events)
                escalating = f"{tag}-e-escalating"
                escalation_expectation(escalated, escalating, want)
                digest_events = [f"{tag}-e-d{n}" for n in range(DIGEST_EVENTS)]
                log(f"posting {len(events)} + {len(digest_events)} + 1 events: "
                    f"{len(want.expected)} deliveries allowed, {len(want.forbidden)} forbidden, "
                    f"and {len(digest_events)} to each of "
                    f"{sum(len(p.devices) for p in digesters)} digest-group devices")
                posted = time.monotonic()
                for event_id, kind in events.items():
                    await client.post_event(EventIn(
                        event_id=event_id, author_id=author, kind=kind, payload={},
                        notify=NotifyIn(channels=["push", "sms", "email"],
                                        message=MessageIn(kind, "chaos"))))
                await client.post_event(EventIn(
                    event_id=escalating, author_id=f"{tag}-escalating-author", kind="alert",
                    payload={}, notify=NotifyIn(
                        channels=["push"], message=MessageIn("escalating", "open me"),
                        escalate=EscalateIn(after=ESCALATE_AFTER_S, to=["sms"]))))
                await open_half(url, escalated, escalating)
                for n, event_id in enumerate(digest_events):
                    await client.post_event(EventIn(
                        event_id=event_id, author_id=f"{tag}-digest-author", kind="update",
                        payload={}, notify=NotifyIn(channels=["push"],
                                                    message=MessageIn(f"update {n}", "chaos"))))
                kills, _ = await asyncio.gather(
                    kill_workers(fleet, rng, args.kills),
                    outage(fakes, Behaviour(**chaos), OUTAGE_AFTER_S, args.outage))
                progress = 0
                while True:
                    got = accepted(fakes)
                    missing = want.expected - set(got)
                    tally = digest_tally(fakes.fcm.ledger.accepted, digesters, digest_events)
                    if ((not missing and not tally.short)
                            or time.monotonic() - posted > args.deadline):
                        break
                    done = len(want.expected) - len(missing)
                    if done // 1000 != progress:
                        progress = done // 1000
                        log(f"{done} of {len(want.expected)} accepted after "
                            f"{time.monotonic() - posted:.0f} s")
                    await asyncio.sleep(2.0)
                elapsed = time.monotonic() - posted
                await asyncio.sleep(5.0)  # anything still in flight would land now
                got = accepted(fakes)
                tally = digest_tally(fakes.fcm.ledger.accepted, digesters, digest_events)
                exited = fleet.exited()
            finally:
                await client.aclose()
                fleet.stop()
            stats = {name: ledger.stats() for name, ledger in fakes.ledgers().items()}
    digest_users = {p.user_id for p in digesters}
    others = {k for k in got if key_user(k) not in digest_users}
    row = {
        "recipients": len(people) + len(digesters) + len(escalated),
        "allowed": len(want.expected),
        "delivered_once": sum(1 for k in want.expected if got.get(k) == 1),
        "missing": len(want.expected - set(got)),
        "missing_by_channel": dict(Counter(k.rsplit(":", 2)[1] for k in
                                           want.expected - set(got))),
        "forbidden_sent": len(want.forbidden & others),
        "unknown_sent": len(others - want.expected - want.forbidden),
        "escalations_sent": sum(1 for k in others if k.startswith(f"{escalating}:")
                                and k.endswith(":sms:sms")),
        "escalations_wanted": len(escalated) // 2,
        "digest": {"devices": tally.devices, "events_each": len(digest_events),
                   "sent_alone": tally.direct, "digests": tally.digests,
                   "held_in_digests": tally.held, "short": tally.short, "over": tally.over,
                   "unreadable": tally.unreadable},
        "breaker": dict(breaker_transitions(log_dir)),
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
        f"| {row['seconds']} |",
        "",
        "| digest group: devices x events | sent alone | digests | events in digests "
        "| devices short | devices over | escalations sent / wanted | breaker transitions |",
        "|---|---|---|---|---|---|---|---|",
        f"| {row['digest']['devices']} x {row['digest']['events_each']} "
        f"| {row['digest']['sent_alone']} | {row['digest']['digests']} "
        f"| {row['digest']['held_in_digests']} | {row['digest']['short']} "
        f"| {row['digest']['over']} | {row['escalations_sent']} / {row['escalations_wanted']} "
        f"| {', '.join(f'{k}: {v}' for k, v in sorted(row['breaker'].items())) or 'none'} |"])


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
    parser.add_argument("--digest-recipients", type=int, default=DIGEST_RECIPIENTS)
    parser.add_argument("--escalation-recipients", type=int, default=ESCALATION_RECIPIENTS)
    parser.add_argument("--outage", type=float, default=OUTAGE_S,
                        help="seconds FCM fails every call (its breaker opens)")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    env = Env(tuple(os.environ["FEEDSVC_CASSANDRA_HOSTS"].split(",")),
              os.environ["FEEDSVC_REDIS_URL"])
    row = asyncio.run(run(env, args))
    print(table(row))
    ok = (row["missing"] == 0 and row["forbidden_sent"] == 0 and row["unknown_sent"] == 0
          and row["delivered_once"] == row["allowed"] and not row["exited"]
          and row["escalations_sent"] == row["escalations_wanted"]
          and not (row["digest"]["short"] or row["digest"]["over"]
                   or row["digest"]["unreadable"]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
