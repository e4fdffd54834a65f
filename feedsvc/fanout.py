"""Fan-out: turn one queued task into inbox rows.

Entry point ``handle(rt, envelope)`` reads like a table of contents:

- ``write_author_partition``: the event in its author's partition (again: intake may not
  have got that far).
- ``deliver_push``: the author's followers, paged ``FOLLOWER_PAGE`` (1,000) at a time, plus
  the author's own inbox; one upserted row per inbox, written by the store in unlogged
  batches, several in flight (the store bounds them).
- ``deliver_pull``: only the author's own inbox; followers pull the author's partition.
- ``deliver_direct``: exactly the listed audience, whatever the author's reach.
- ``backfill``: a new follower of a push author gets the author's last 20 events.
- ``unmerge``: an unfollowed author's pushed rows leave the user's inbox.

Every write is an upsert keyed by (user, created_at, event_id), so a task redone after a
crash rewrites the same rows: at-least-once delivery, exactly one row per follower. A
completed fan-out is settled in the outbox, so the sweeper does not queue it again.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence

from feedsvc import metrics
from feedsvc.model import (
    BACKFILL_EVENTS,
    FOLLOWER_PAGE,
    BackfillTask,
    Envelope,
    Event,
    FanoutTask,
    InboxItem,
    NotifyTask,
    UnmergeTask,
)
from feedsvc.runtime import Runtime

log = logging.getLogger(__name__)

PAGES_IN_FLIGHT = 4  # follower pages being written at once, per event


async def handle(rt: Runtime, envelope: Envelope) -> None:
    task = envelope.task
    if isinstance(task, FanoutTask):
        await fan_out(rt, task.event)
    elif isinstance(task, BackfillTask):
        await backfill(rt, task.pairs)
    elif isinstance(task, UnmergeTask):
        await unmerge(rt, task.pairs)


async def fan_out(rt: Runtime, event: Event) -> int:
    """Write the event's inbox rows, then settle it in the outbox (an event that notifies:
    queue its notify fan-out, which settles it); returns how many rows were written."""
    ttl = rt.ttl_left_s(event.created_at)
    written = 0
    if ttl > 0:  # else already past retention: nothing to show
        item = InboxItem.of(event)
        if event.route == "direct":
            written = await deliver_direct(rt, item, event.audience or [], ttl)
        else:
            # Intake wrote it already, unless it failed or crashed on the way.
            await write_author_partition(rt, event, ttl)
            if event.route == "pull":
                written = await deliver_pull(rt, item, ttl)
            else:
                written = await deliver_push(rt, item, ttl)
        metrics.fanned_out(event.route, written, event.accepted_at, rt.now_ms())
        log.debug("event %s fanned out to %d inboxes", event.event_id, written)
        if event.notify is not None:
            # Notifications go out once the event is in every inbox (a first page; the
            # notify fan-out pages on from there, and settles the event in the outbox
            # after its last page: feedsvc/delivery/notify.py).
            await rt.queue.enqueue(event.priority, Envelope(NotifyTask(event), rt.now_ms()))
            await rt.outbox.mark_queued(event.event_id, event.accepted_at, rt.now_ms(), ttl)
            return written
    await rt.outbox.settle(event.event_id, event.accepted_at, max(1, ttl))
    return written


async def write_author_partition(rt: Runtime, event: Event, ttl: int) -> None:
    """The event in its author's partition (direct events never enter it), and for a pull
    event the author in the pull set for as long as the event is retained (it may be
    dated a little into the future), then the notice that drops cached heads of a pull
    author. Upserts: intake and the worker both write them."""
    if event.route == "direct":
        # Indexed under its author only so that an erasure can find it (feedsvc/erasure.py).
        await rt.policy.erasures.index_direct(event.author_id, event.created_at,
                                              event.event_id, ttl)
        return
    await rt.store.put_author_event(InboxItem.of(event), ttl)
    if event.route == "pull":
        await rt.store.touch_pull_author(
            event.author_id, max(rt.settings.retention_ms // 1000, ttl))
        # Readers' cached heads of the author are stale now, in every API process; the
        # worker's rewrite says so too (intake may have died before its own notice).
        await rt.notices.author_posted(event.author_id)


async def _write(rt: Runtime, users: Sequence[str], item: InboxItem, ttl: int) -> None:
    await rt.store.write_inbox(users, item, ttl)
    await _maybe_trim(rt, users)


async def deliver_direct(rt: Runtime, item: InboxItem, audience: Sequence[str],
                         ttl: int) -> int:
    users = list(dict.fromkeys(audience))
    for start in range(0, len(users), FOLLOWER_PAGE):
        await _write(rt, users[start:start + FOLLOWER_PAGE], item, ttl)
    return len(users)


async def deliver_pull(rt: Runtime, item: InboxItem, ttl: int) -> int:
    await _write(rt, [item.author_id], item, ttl)
    return 1


async def deliver_push(rt: Runtime, item: InboxItem, ttl: int) -> int:
    """The author's own inbox, then every follower, a page of 1,000 at a time; up to
    ``PAGES_IN_FLIGHT`` pages are written while the next page of followers is read."""
    await _write(rt, [item.author_id], item, ttl)
    written = 1
    room = asyncio.Semaphore(PAGES_IN_FLIGHT)
    writes: list[asyncio.Future[None]] = []

    async def write_page(page: list[str]) -> None:
        try:
            await _write(rt, page, item, ttl)
        finally:
            room.release()

    try:
        async for page in rt.store.follower_pages(item.author_id, FOLLOWER_PAGE):
            await room.acquire()
            for done in (w for w in writes if w.done()):
                done.result()  # surface a failed page now, not after the last one
            writes.append(asyncio.ensure_future(write_page(page)))
            written += len(page)
        await asyncio.gather(*writes)
    except BaseException:
        for w in writes:
            w.cancel()
        await asyncio.gather(*writes, return_exceptions=True)
        raise
    return written


async def _maybe_trim(rt: Runtime, users: Sequence[str]) -> None:
    """Keep inboxes near ``inbox_max`` rows: a random one write in ``trim_every`` checks
    the cap, so an inbox holds at most about ``inbox_max + trim_every`` rows between trims
    while the cost stays a few key reads per row written."""
    chance = 1.0 / rt.settings.trim_every
    chosen = [u for u in users if random.random() < chance]
    if chosen:
        await asyncio.gather(*(rt.store.trim_inbox(u, rt.settings.inbox_max) for u in chosen))


async def backfill(rt: Runtime, pairs: Sequence[tuple[str, str]]) -> None:
    since = rt.now_ms() - rt.settings.retention_ms
    for user_id, author_id in pairs:
        if not await rt.store.following_subset(user_id, [author_id]):
            continue  # unfollowed again before the job ran
        for item in await rt.store.author_events(author_id, None, BACKFILL_EVENTS, since):
            ttl = rt.ttl_left_s(item.created_at)
            if ttl > 0:
                await rt.store.write_inbox([user_id], item, ttl)
                metrics.rows_written(1)


async def unmerge(rt: Runtime, pairs: Sequence[tuple[str, str]]) -> None:
    for user_id, author_id in pairs:
        if await rt.store.following_subset(user_id, [author_id]):
            continue  # followed again before the job ran
        removed = await rt.store.delete_inbox_author(user_id, author_id)
        log.debug("unmerge %s from %s: %d rows", author_id, user_id, removed)
