"""Escalation: a push that was not opened in time is followed, once, by another channel.

Where it sits: ``notify.escalate = {"after": s, "to": [channels]}`` makes the notify
fan-out schedule an ``EscalateTask`` per recipient of the push, due ``after`` seconds past
the time the push was due (a scheduled queue entry: it survives restarts).
``POST /v1/notifications/{notification_id}/opened`` (the recipient's own token) marks the
notification opened (``mark_opened``; a provider's status report of the push as opened
counts too). When the task comes due, ``escalate`` sends
nothing if it was opened; inside the recipient's quiet hours (quiet hours that began after
the push) it waits for their end, unless the notification is critical; otherwise it
queues the delivery on the first channel of ``to`` the recipient allows, with the rest of
``to`` as its chain (a channel that cannot reach them moves on to the next, see
``feedsvc/delivery/send.py``). That delivery has its channel's send-once key: it goes
out once, however often the task is redone.
"""

from __future__ import annotations

import logging

from feedsvc.delivery.policy import next_channel, quiet_until
from feedsvc.delivery.recipients import Preferences, channel_allowed
from feedsvc.delivery.state import DeliveryRecord
from feedsvc.model import ChannelTask, Envelope, EscalateTask
from feedsvc.runtime import Runtime

log = logging.getLogger(__name__)


def opened_key(event_id: str, user_id: str) -> str:
    return f"opened/{event_id}/{user_id}"  # '/' is in no event or user id


async def mark_opened(rt: Runtime, event_id: str, user_id: str, ttl_s: int) -> None:
    await rt.delivery.policy_state.mark(opened_key(event_id, user_id), max(1, ttl_s))


async def opened(rt: Runtime, event_id: str, user_id: str) -> bool:
    """Opened, as the app reported it, or as a provider's status report put it in the
    delivery log (``feedsvc/delivery/status.py``)."""
    if await rt.delivery.policy_state.marked(opened_key(event_id, user_id)):
        return True
    return any(r.channel == "push" and r.status == "opened"
               for r in await rt.delivery.log.records(event_id, user_id))


async def escalate(rt: Runtime, task: EscalateTask) -> None:
    event, notify = task.event, task.event.notify
    escalate = notify.escalate if notify is not None else None
    if notify is None or escalate is None:
        return
    ttl = max(1, rt.ttl_left_s(event.created_at))
    if await opened(rt, event.event_id, task.user_id):
        await rt.delivery.log.record(event.event_id, task.user_id, DeliveryRecord(
            escalate.to[0], "escalation", "suppressed", "opened",
            updated_at=rt.now_ms()), ttl)
        return
    prefs = await rt.recipients.preferences(task.user_id) or Preferences()
    until = None if notify.critical else quiet_until(prefs.quiet_hours, rt.now_ms())
    if until is not None:  # quiet hours began since the push: escalate when they end
        await rt.queue.schedule(escalate.to[0], event.priority, Envelope(task, until), until)
        return
    chosen = next_channel(tuple(escalate.to),
                          lambda c: channel_allowed(prefs, event.kind, c))
    if chosen is None:
        return
    channel, rest = chosen
    await rt.queue.enqueue(event.priority, Envelope(
        ChannelTask(event, task.user_id, channel, task.locale, via="escalation", chain=rest),
        rt.now_ms()), queue=channel)
    await rt.delivery.log.record(event.event_id, task.user_id, DeliveryRecord(
        channel, "escalation", "queued", "not_opened", updated_at=rt.now_ms()), ttl)
    log.debug("escalating %s to %s on %s", event.event_id, task.user_id, channel)
