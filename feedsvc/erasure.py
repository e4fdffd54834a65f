"""Erasure: ``DELETE /v1/users/{u}`` removes a user and everything of theirs.

Where it sits: the API starts it (``request_erasure``), the fan-out workers finish it
(``erase_step``, one ``EraseTask`` per batch), ``GET /v1/users/{u}/erasure`` shows where
it is (``ErasureStatus``).

At once, in the request (bounded work):
- a tombstone (``Erasures.tombstone``): from then on intake refuses the user's events
  (``user_erased``) and leaves them out of direct audiences, follows and recipient writes
  naming them are refused, the notify fan-out and the channel workers send them nothing,
  status reports about them are ignored, and reads drop their events;
- their devices, contacts, preferences and read mark are removed.

In the background, one batch (``BATCH``) per task, each step repeated until it finds
nothing, the progress recorded after each batch (``removed`` per kind):
1. ``following``: their follow edges, counts fixed (each author's mode re-evaluated);
2. ``followers``: the edges of their followers, counts fixed, and their pushed events
   removed from each follower's inbox;
3. ``events``: their events in their author partition and by id (the door dedup key);
4. ``direct``: their direct events (indexed by author when written), in every inbox of
   their audience and by id;
5. ``deliveries``: their delivery log, the send-once keys of those deliveries, and the
   provider message ids that name them;
6. ``inbox``: their own inbox.

Every step is idempotent, so a batch redone (a worker died) removes nothing twice. The
task is a queue entry, but the job is recorded in the store (``erasures_pending`` and its
status): if the status stops moving for ``STALLED_MS`` (a Redis that lost the entry), the
outbox sweeper (``resume_stalled``), or a ``DELETE`` again, queues it again at the
recorded step; while it moves, ``DELETE`` only answers its progress. A fan-out of their
event still queued when the erasure came is dropped by the worker (``workers.handle``),
so no row of theirs is written behind the job.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

import msgspec

from feedsvc import graph
from feedsvc.delivery.notify import claim_key
from feedsvc.model import Envelope, EraseTask
from feedsvc.runtime import Runtime
from feedsvc.store.policy import ErasureStatus

log = logging.getLogger(__name__)

STEPS = ("following", "followers", "events", "direct", "deliveries", "inbox")
BATCH = 500
STALLED_MS = 60_000  # a job whose status has not moved this long is queued again
DIRECT_BATCH = 20  # direct events per batch (each reaches up to 10,000 inboxes)
IN_FLIGHT = 32  # deletes in flight per batch


async def request_erasure(rt: Runtime, user_id: str) -> ErasureStatus:
    """Tombstone the user, remove the small things now, queue the rest (see the module)."""
    erasures = rt.policy.erasures
    existing = await erasures.status(user_id)
    if existing is not None and existing.state == "done":
        return existing
    now = rt.now_ms()
    await erasures.tombstone(user_id, now)
    rt.erased.add(user_id, now)
    devices = await rt.recipients.devices(user_id)
    await asyncio.gather(*(rt.recipients.delete_device(user_id, d.device_id) for d in devices),
                         erasures.delete_contacts_and_preferences(user_id),
                         rt.policy.reads.forget_seen(user_id))
    if existing is not None and now - existing.updated_at < STALLED_MS:
        return existing  # moving: a second chain of tasks would only repeat its work
    status = existing or ErasureStatus(user_id, "queued", STEPS[0], now, now,
                                       {"devices": len(devices)})
    status = msgspec.structs.replace(status, updated_at=now)
    await erasures.set_pending(user_id, True)
    await erasures.put_status(status)
    await rt.queue.enqueue("medium", Envelope(
        EraseTask(user_id, status.step, status.generation), now))
    return status


async def resume_stalled(rt: Runtime, stalled_ms: int = STALLED_MS) -> int:
    """Queue again every unfinished erasure whose status has not moved for ``stalled_ms``
    (its queue entry was lost); the outbox sweeper calls it. Returns how many."""
    erasures, now, resumed = rt.policy.erasures, rt.now_ms(), 0
    for user_id in await erasures.pending():
        status = await erasures.status(user_id)
        if status is None or status.state == "done":
            await erasures.set_pending(user_id, False)
        elif now - status.updated_at >= stalled_ms:
            status = msgspec.structs.replace(status, updated_at=now,
                                             generation=status.generation + 1)
            await erasures.put_status(status)
            await rt.queue.enqueue("medium", Envelope(
                EraseTask(user_id, status.step, status.generation), now))
            resumed += 1
    return resumed


async def erase_step(rt: Runtime, task: EraseTask) -> None:
    """One batch of ``task.step``; then the next batch's task (or the next step's)."""
    erasures = rt.policy.erasures
    status = await erasures.status(task.user_id)
    if (status is None or status.state == "done" or task.step not in STEPS
            or task.generation != status.generation):
        return  # an old task: of a finished erasure, of a chain replaced when it seemed
        # stalled, or of a step this version does not know
    removed = await _BATCHES[task.step](rt, task.user_id)
    step = task.step
    if removed == 0:
        index = STEPS.index(step) + 1
        step = STEPS[index] if index < len(STEPS) else "done"
    counts = dict(status.removed)
    counts[task.step] = counts.get(task.step, 0) + removed
    status = msgspec.structs.replace(
        status, state="done" if step == "done" else "running", step=step,
        updated_at=rt.now_ms(), removed=counts)
    await erasures.put_status(status)
    if step != "done":
        await rt.queue.enqueue("medium", Envelope(
            EraseTask(task.user_id, step, status.generation), rt.now_ms()))
    else:
        await erasures.set_pending(task.user_id, False)
        log.info("user %s erased: %s", task.user_id, counts)


async def _bounded(calls: list[Awaitable[object]]) -> None:
    limit = asyncio.Semaphore(IN_FLIGHT)

    async def one(call: Awaitable[object]) -> None:
        async with limit:
            await call

    await asyncio.gather(*(one(c) for c in calls))


async def _following(rt: Runtime, user_id: str) -> int:
    authors, _ = await rt.store.following_page(user_id, None, BATCH)

    async def drop(author_id: str) -> None:
        await rt.store.unfollow(user_id, author_id)
        await graph.refresh_mode(rt, author_id)

    await _bounded([drop(a) for a in authors])
    return len(authors)


async def _followers(rt: Runtime, user_id: str) -> int:
    followers, _ = await rt.store.followers_page(user_id, None, BATCH)

    async def drop(follower_id: str) -> None:
        await rt.store.unfollow(follower_id, user_id)
        await rt.store.delete_inbox_author(follower_id, user_id)

    await _bounded([drop(f) for f in followers])
    return len(followers)


async def _events(rt: Runtime, user_id: str) -> int:
    since = rt.now_ms() - rt.settings.retention_ms
    items = await rt.store.author_events(user_id, None, BATCH, since)
    await _bounded([rt.policy.erasures.delete_event(user_id, i.created_at, i.event_id)
                    for i in items])
    return len(items)


async def _direct(rt: Runtime, user_id: str) -> int:
    erasures = rt.policy.erasures
    positions = await erasures.direct_events(user_id, DIRECT_BATCH)
    for position in positions:
        event = await rt.store.get_event(position.event_id)
        if event is not None and event.author_id == user_id:
            await _bounded([erasures.delete_inbox_row(u, event.created_at, event.event_id)
                            for u in event.audience or []])
        await erasures.delete_direct(user_id, position.created_at, position.event_id)
    return len(positions)


async def _deliveries(rt: Runtime, user_id: str) -> int:
    events = await rt.policy.erasures.delivery_events(user_id, BATCH)

    async def drop(event_id: str) -> None:
        for record in await rt.delivery.log.records(event_id, user_id):
            await rt.delivery.once.forget(claim_key(event_id, user_id, record.channel,
                                                    record.target))
        await rt.policy.erasures.delete_deliveries(user_id, event_id)

    await _bounded([drop(e) for e in events])
    if not events:
        return await rt.policy.receipts.forget_user(user_id)
    return len(events)


async def _inbox(rt: Runtime, user_id: str) -> int:
    await rt.policy.erasures.delete_inbox(user_id)
    return 0  # one deletion of the whole inbox: the step ends here


_BATCHES = {"following": _following, "followers": _followers, "events": _events,
            "direct": _direct, "deliveries": _deliveries, "inbox": _inbox}
