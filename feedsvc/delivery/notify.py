"""Notify fan-out: one page of an event's audience becomes per-channel work.

Where it sits: the fan-out worker, once an event with ``notify`` has reached every inbox,
queues a ``NotifyTask`` for its first page (``fanout.fan_out``). ``notify_page`` handles one
page: the audience (``audience.users`` of a direct event, else the author's followers
whatever the author's reach; never the author), ``NOTIFY_PAGE`` (1,000) recipients at a
time; for each recipient their preferences decide the channels (a kind override first,
then the channel switch), and a ``ChannelTask`` per allowed channel goes to that channel's
queue with the event's priority (``feedsvc/delivery/send.py`` takes it from there). A
channel the recipient turned off is logged ``suppressed`` with reason ``preference``.

Quiet hours: a recipient inside their ``quiet_hours`` gets a non-critical notification's
channel work as a scheduled entry due at the window's end (logged ``scheduled`` with
reason ``quiet_hours``), not now. Escalation: with ``notify.escalate``, each recipient of
the push gets an ``EscalateTask`` scheduled ``after`` seconds past the time the push is
due (``feedsvc/delivery/escalation.py``).

The next page is a new task queued after this page's work: a 1,000,000-follower audience
is walked with one page in memory and resumes where it stopped after a crash (a page
redone queues its channel tasks again; send-once keeps them to one send each). The outbox
row of the event is settled after the last page (each page marks it queued again, so the
sweeper leaves a chain that is moving alone).
"""

from __future__ import annotations

import asyncio

from feedsvc.delivery.policy import quiet_until
from feedsvc.delivery.recipients import DEFAULT_LOCALE, Preferences, channel_allowed
from feedsvc.delivery.state import DeliveryRecord
from feedsvc.model import ChannelTask, Envelope, EscalateTask, Event, NotifyTask
from feedsvc.runtime import Runtime

NOTIFY_PAGE = 1_000
PREFERENCE_READS = 64  # preferences read in flight per page


def notification_id(event_id: str, user_id: str) -> str:
    """The id clients see (``event_id:user_id``). Ids may contain ``:``, so it is not a key:
    the delivery log is keyed by the pair, send-once claims by ``claim_key``."""
    return f"{event_id}:{user_id}"


def claim_key(event_id: str, user_id: str, channel: str, target: str) -> str:
    """A delivery's send-once key: joined with ``/``, which no event, user or device id may
    contain, so two deliveries never share it (the ``:``-joined delivery key could)."""
    return f"{event_id}/{user_id}/{channel}/{target}"


async def audience_page(rt: Runtime, event: Event, after: str | None
                        ) -> tuple[list[str], str | None]:
    """One page of recipients and the continuation (None at the end)."""
    if event.audience is not None:
        start = int(after) if after and after.isdigit() else 0
        end = start + NOTIFY_PAGE
        page = event.audience[start:end]
        return page, (str(end) if end < len(event.audience) else None)
    return await rt.store.followers_page(event.author_id, after, NOTIFY_PAGE)


async def notify_page(rt: Runtime, task: NotifyTask) -> int:
    """Queue the channel work of one page and the next page's task; returns how many
    channel tasks were queued."""
    event, notify = task.event, task.event.notify
    if notify is None:
        return 0
    users, after = await audience_page(rt, event, task.after)
    erased = await rt.erased.get(rt)
    users = [u for u in users if u != event.author_id and u not in erased]
    limit = asyncio.Semaphore(PREFERENCE_READS)

    async def preferences(user_id: str) -> Preferences:
        async with limit:
            return await rt.recipients.preferences(user_id) or Preferences()

    chosen = await asyncio.gather(*(preferences(u) for u in users))
    ttl = max(1, rt.ttl_left_s(event.created_at))
    queued = 0
    now = rt.now_ms()
    due = {user_id: None if notify.critical else quiet_until(prefs.quiet_hours, now)
           for user_id, prefs in zip(users, chosen, strict=True)}
    for channel in dict.fromkeys(notify.channels):
        tasks: list[Envelope] = []
        for user_id, prefs in zip(users, chosen, strict=True):
            if channel_allowed(prefs, event.kind, channel):
                work = ChannelTask(event, user_id, channel, prefs.locale or DEFAULT_LOCALE)
                until = due[user_id]
                if until is None:
                    tasks.append(Envelope(work, rt.now_ms()))
                else:
                    await _after_quiet_hours(rt, work, until, ttl)
                if channel == "push" and notify.escalate is not None:
                    await _schedule_escalation(rt, event, user_id, work.locale,
                                               until or now)
            else:
                await rt.delivery.log.record(
                    event.event_id, user_id,
                    DeliveryRecord(channel, channel, "suppressed", "preference",
                                   updated_at=rt.now_ms()), ttl)
        for start in range(0, len(tasks), 500):
            await rt.queue.enqueue_many(channel, event.priority, tasks[start:start + 500])
        queued += len(tasks)
    if after is not None:
        # Each page tells the outbox the event is still being worked on; a chain broken
        # by a lost entry is found by the sweeper FEEDSVC_SWEEP_AFTER later, which starts
        # the event over (send-once keeps that to one send per delivery). A page redone
        # (its worker died before the ack) queues its successor again: the rest of the
        # audience is then walked twice, which costs work but sends nothing twice.
        await rt.outbox.mark_queued(event.event_id, event.accepted_at, rt.now_ms(), ttl)
        await rt.queue.enqueue(event.priority,
                               Envelope(NotifyTask(event, after), rt.now_ms()))
    else:
        await rt.outbox.settle(event.event_id, event.accepted_at, ttl)
    return queued


async def _after_quiet_hours(rt: Runtime, task: ChannelTask, until: int, ttl: int) -> None:
    """Queue the channel work when the recipient's quiet hours end. Its envelope counts as
    queued then (so a low-priority one is not taken for stale and shed)."""
    await rt.queue.schedule(task.channel, task.event.priority, Envelope(task, until), until)
    await rt.delivery.log.record(
        task.event.event_id, task.user_id,
        DeliveryRecord(task.channel, task.channel, "scheduled", "quiet_hours",
                       updated_at=rt.now_ms()), ttl)


async def _schedule_escalation(rt: Runtime, event: Event, user_id: str, locale: str,
                               push_at: int) -> None:
    escalate = event.notify.escalate if event.notify is not None else None
    assert escalate is not None
    due = push_at + escalate.after * 1000
    await rt.queue.schedule(escalate.to[0], event.priority,
                            Envelope(EscalateTask(event, user_id, locale), due), due)
