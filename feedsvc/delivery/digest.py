"""Rate limits that roll into digests: per recipient and channel, at most
``FEEDSVC_NOTIFY_RATE`` deliveries a window; the rest are held and sent as one digest.

Where it sits: between a channel task's claim and ``send.deliver`` (``workers.handle``).
``hold_over_limit`` counts the notification's arrival in the recipient's window of that
channel (``PolicyState.arrive``: a task redone gets its first number again, so it is
never counted twice); past the limit it keeps the notification's title for the digest,
logs the delivery ``suppressed``/``digested`` with the digest's notification id, and the
first one held schedules the window's ``DigestTask`` for just after the window ends.
Critical notifications, retries of one target, and digests themselves are not counted.

``send_digest`` runs at the window's end: everything held becomes one delivery, the
``digest`` template if there is one (variables ``data.count`` and ``data.titles``), else
"N new notifications" and the first few titles. The digest is a notification of its own
(event id ``digest:{channel}:{window start}``, see ``RateWindow``), sent through
``send.deliver`` with its own send-once key: a digest task redone sends nothing twice.
The digest waits for the end of the recipient's quiet hours like any delivery.
"""

from __future__ import annotations

import logging

import msgspec

from feedsvc.delivery import send
from feedsvc.delivery.notify import notification_id
from feedsvc.delivery.policy import (
    DIGEST_GRACE_MS,
    RateWindow,
    digest_text,
    over_limit,
    quiet_until,
    rate_window,
)
from feedsvc.delivery.providers.registry import Providers
from feedsvc.delivery.recipients import Preferences, channel_allowed
from feedsvc.delivery.state import DeliveryRecord
from feedsvc.delivery.templates import EventVars, render
from feedsvc.errors import RenderError
from feedsvc.model import ChannelTask, DigestTask, Envelope, Event, MessageIn, NotifyIn
from feedsvc.runtime import Runtime

log = logging.getLogger(__name__)

DIGEST_TEMPLATE = "digest"
DIGEST_AUTHOR = "feedsvc"


class Held(msgspec.Struct, frozen=True, array_like=True):
    """One notification held for a digest."""

    event_id: str
    title: str


QUIET_HOURS_MAX_S = 24 * 3600  # the longest a quiet-hours window can delay a digest
_encoder = msgspec.msgpack.Encoder()
_held = msgspec.msgpack.Decoder(Held)


async def hold_over_limit(rt: Runtime, task: ChannelTask) -> bool:
    """True when the delivery is over its window's limit and was held for the digest (the
    caller sends nothing); False when it goes out now."""
    notify = task.event.notify
    rate = rt.settings.notify_rate.get(task.channel)
    if (notify is None or notify.critical or rate is None or task.via == "digest"
            or task.target is not None):
        return False
    now = rt.now_ms()
    window = rate_window(rate, now)
    key = window.key(task.user_id, task.channel)
    # Past the digest's run, which quiet hours may put off by up to a day: held items that
    # expired before it ran were dropped with it.
    keep_s = (window.end_ms - now) / 1000 + rate.period_s + QUIET_HOURS_MAX_S
    order = await rt.delivery.policy_state.arrive(key, task.event.event_id, keep_s)
    if not over_limit(order, rate):
        return False
    try:
        title, _ = await send.text_of(rt, task)
    except RenderError:
        title = task.event.kind
    await rt.delivery.policy_state.hold(key, order, _encoder.encode(Held(task.event.event_id,
                                                                   title)), keep_s)
    digest_id = notification_id(window.digest_event_id(task.channel), task.user_id)
    await rt.delivery.log.record(
        task.event.event_id, task.user_id,
        DeliveryRecord(task.channel, task.channel, "suppressed", "digested",
                       updated_at=now, digest=digest_id),
        max(1, rt.ttl_left_s(task.event.created_at)))
    if order == rate.tokens + 1:  # the first one held (a redo schedules it again: harmless)
        due = window.end_ms + DIGEST_GRACE_MS
        await rt.queue.schedule(task.channel, "medium", Envelope(
            DigestTask(task.user_id, task.channel, window.start_ms, window.end_ms,
                       task.locale), due), due)
    return True


async def send_digest(rt: Runtime, task: DigestTask, providers: Providers,
                      holder: str) -> None:
    window = RateWindow(task.window_start, task.window_end)
    items = [_held.decode(raw) for raw in
             await rt.delivery.policy_state.held(window.key(task.user_id, task.channel))]
    if not items:
        return
    prefs = await rt.recipients.preferences(task.user_id) or Preferences()
    if not channel_allowed(prefs, DIGEST_TEMPLATE, task.channel):
        return
    until = quiet_until(prefs.quiet_hours, rt.now_ms())
    if until is not None:
        await rt.queue.schedule(task.channel, "medium", Envelope(task, until), until)
        return
    event_id = window.digest_event_id(task.channel)
    titles = [item.title for item in items]
    title, body = await _digest_text(rt, event_id, task, titles)
    event = Event(
        event_id=event_id, author_id=DIGEST_AUTHOR, kind=DIGEST_TEMPLATE,
        created_at=task.window_end, priority="medium", payload="{}", route="direct",
        accepted_at=rt.now_ms(), body_hash="",
        notify=NotifyIn(channels=[task.channel], message=MessageIn(title[:256], body[:4096]),
                        data={"count": len(items)}))
    log.debug("digest of %d for %s on %s", len(items), task.user_id, task.channel)
    await send.deliver(rt, ChannelTask(event, task.user_id, task.channel, task.locale,
                                       via="digest"), providers, holder)


async def _digest_text(rt: Runtime, event_id: str, task: DigestTask,
                       titles: list[str]) -> tuple[str, str]:
    """The ``digest`` template in the recipient's locale if there is one (and it renders),
    else the built-in text."""
    template = await send.templates.get(rt, DIGEST_TEMPLATE)
    if template is not None:
        try:
            rendered = render(DIGEST_TEMPLATE, template, task.locale,
                              data={"count": len(titles), "titles": titles},
                              event=EventVars(event_id, DIGEST_AUTHOR, DIGEST_TEMPLATE, {}),
                              user_id=task.user_id)
            return rendered.title, rendered.body
        except RenderError as exc:
            log.warning("digest template does not render (%s); the built-in text is used",
                        exc)
    return digest_text(len(titles), titles)


