"""Channel workers: one recipient's notification on one channel, sent once per target.

``deliver(rt, task, providers)`` reads like the flow:

1. ``targets``: for push every device of the user (inactive ones are logged
   ``suppressed``/``inactive``; none at all is ``no_device``); for sms and email the
   contact (``no_contact``, or ``inactive`` after a bounce or an unreachable number).
2. per target, a delivery with the key ``notification_id:channel:target``:
   - no provider configured for it: ``suppressed``/``channel_not_configured``;
   - ``SendOnce.claim_many`` (every target's key in one round trip): a key already sent
     is never sent again (a retry, a reclaim after a crash, a dead-letter replay); a key
     another worker holds right now is looked at again after its lease;
   - render the text once (the template in the recipient's locale, or the inline
     message); a render error dead-letters each delivery with reason ``render_error``;
   - the provider calls, with ``Idempotency-Key: <delivery key>``, all at once; then
     ``mark_sent_many`` of those accepted, their log records, their message ids.
3. outcomes: sent; a transient failure (connection, timeout, 5xx, 429) releases the claim
   and schedules a retry of that one target (exponential backoff with full jitter, capped,
   never sooner than the provider's Retry-After) until ``FEEDSVC_DELIVERY_MAX_ATTEMPTS``
   calls, then dead-letters it (``exhausted``); a rejection dead-letters it at once
   (``rejected``); a dead target deactivates the device or contact (``failed`` with the
   provider's reason).

The one window left is a crash between the provider's answer and the sent mark: the
redone delivery calls the provider again with the same ``Idempotency-Key``, which a
provider that de-duplicates (the test fakes do) answers without a second message. A task's
targets are claimed together and marked sent together once every call has answered (one
Redis round trip each, not one per target), so that window lasts until the task's slowest
provider call has answered, at most ``FEEDSVC_PROVIDER_TIMEOUT``; their log records and
message ids are then written as one batch each.

Policy (``feedsvc/delivery/policy.py``): each provider has a circuit breaker
(``feedsvc/delivery/breaker.py``); while it is open a delivery is not attempted. A delivery
that may fall back (critical or high priority with ``notify.fallback``, or one that is
itself a fallback or an escalation with channels left in its ``chain``) goes on to the next
channel the recipient allows: when the breaker is open, when the channel cannot reach the
recipient (no device, no contact, inactive) and when its retries are exhausted. Any other
delivery waits for the breaker's cooldown (``scheduled``/``breaker_open``), never dropped.
The next channel's delivery has its own send-once key, which a notification that asked
for that channel anyway shares: it is sent once either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Literal

import msgspec

from feedsvc import metrics
from feedsvc.delivery.breaker import CircuitBreaker
from feedsvc.delivery.notify import claim_key, notification_id
from feedsvc.delivery.policy import fallback_chain, may_fall_back, next_channel
from feedsvc.delivery.providers.base import Outgoing, Receipt, TargetKind, WebPushKeys
from feedsvc.delivery.providers.registry import Providers
from feedsvc.delivery.recipients import (
    Device,
    Preferences,
    channel_allowed,
    deactivate_contact,
)
from feedsvc.delivery.state import DeliveryRecord, DeliveryStatus
from feedsvc.delivery.status import remember_sent
from feedsvc.delivery.templates import EventVars, Template, render
from feedsvc.errors import (
    DeadTarget,
    ProviderRejected,
    ProviderUnavailable,
    RenderError,
    RetryableError,
)
from feedsvc.model import ChannelTask, Envelope
from feedsvc.runtime import Runtime
from feedsvc.store.policy import SentRef

log = logging.getLogger(__name__)

RETRY_BASE_S = 1.0
RETRY_CAP_S = 300.0
BUSY_RECHECK_S = 5.0  # a key another worker holds is looked at again after this
BREAKER_SPREAD_S = 1.0  # waits for an open breaker end spread over this much more
TEMPLATE_CACHE_S = 5.0  # a process reuses a template this long


def retry_delay(attempt: int, retry_after: float | None, rng: random.Random | None = None
                ) -> float:
    """Seconds before retry ``attempt`` (1-based): full-jitter exponential backoff, capped,
    and never sooner than the provider's ``Retry-After``."""
    backoff = (rng or random).uniform(0, min(RETRY_CAP_S, RETRY_BASE_S * 2 ** (attempt - 1)))
    return max(backoff, retry_after or 0.0)


@dataclass(frozen=True)
class Target:
    kind: TargetKind
    target: str  # device_id, "sms" or "email"
    address: str  # token, endpoint, phone number or email address
    webpush: WebPushKeys | None = None
    device: Device | None = None


class _Templates:
    """Templates by name, reused for ``TEMPLATE_CACHE_S`` by this process."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[float, Template | None]] = {}

    async def get(self, rt: Runtime, name: str) -> Template | None:
        now = time.monotonic()
        hit = self._cache.get(name)
        if hit is None or now - hit[0] > TEMPLATE_CACHE_S:
            hit = (now, await rt.delivery.templates.template(name))
            self._cache[name] = hit
        return hit[1]


templates = _Templates()


async def deliver(rt: Runtime, task: ChannelTask, providers: Providers, holder: str) -> None:
    """Every target of one recipient's notification on one channel (see the module), the
    targets at once (a user has at most 20 devices). The common case costs one round trip
    per step for the whole task, not one per target: the claims, the provider calls, the
    sent marks, the log records, the providers' message ids. What did not go out (a
    retry, a breaker, a dead letter) is handled once the sent ones are marked."""
    reachable = await targets(rt, task)
    if not reachable:
        if task.target is None:
            await fall_back(rt, task)
        return
    done: list[DeliveryRecord] = []
    configured = []
    for target in reachable:
        if providers.for_target(target.kind) is None:
            metrics.delivered(task.channel, target.kind, "suppressed")
            done.append(_record(rt, task, target.target, "suppressed",
                                "channel_not_configured"))
        else:
            configured.append(target)
    keys = [claim_key(task.event.event_id, task.user_id, task.channel, target.target)
            for target in configured]
    lease = rt.settings.provider_timeout * 2 + 5
    states = await rt.delivery.once.claim_many(keys, holder, lease) if keys else []
    claimed = [(target, key) for target, key, state in zip(configured, keys, states,
                                                              strict=True)
               if state == "claimed"]
    text = await _text(rt, task) if claimed else None
    outcomes = await asyncio.gather(*(_call_target(rt, task, target, text, providers)
                                      for target, _ in claimed), return_exceptions=True)
    sent = [(target, key, outcome) for (target, key), outcome in zip(claimed, outcomes,
                                                                     strict=True)
            if isinstance(outcome, Receipt)]
    if sent:
        await rt.delivery.once.mark_sent_many([key for _, key, _ in sent])
    for target, _, receipt in sent:
        metrics.delivered(task.channel, target.kind, "sent")
        done.append(_record(rt, task, target.target, "sent", None,
                            _attempts(task, target) + 1))
        log.debug("sent %s:%s:%s via %s (%s)", notification_id(task.event.event_id,
                  task.user_id), task.channel, target.target, receipt.provider,
                  receipt.message_id)
    rest: list[Awaitable[None]] = [_written(rt, task, done, sent)]
    rest += [_unsent(rt, task, target, key, holder, outcome)
             for (target, key), outcome in zip(claimed, outcomes, strict=True)
             if outcome is None or isinstance(outcome, Exception)]
    rest += [_reschedule(rt, task, target, _attempts(task, target), BUSY_RECHECK_S)
             for target, state in zip(configured, states, strict=True) if state == "busy"]
    results = await asyncio.gather(*rest, return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    failures += [o for o in outcomes  # a cancelled call: not handled by ``_unsent``
                 if isinstance(o, BaseException) and not isinstance(o, Exception)]
    if failures:  # every target had its turn; then the first failure redoes the task
        raise failures[0]


async def _written(rt: Runtime, task: ChannelTask, done: Sequence[DeliveryRecord],
                   sent: Sequence[tuple[Target, str, Receipt]]) -> None:
    """The log records, then the message ids (so a provider's status report, which finds
    the delivery by its id, never lands before the ``sent`` it moves on)."""
    ttl = max(1, rt.ttl_left_s(task.event.created_at))
    await rt.delivery.log.record_many(task.event.event_id, task.user_id, done, ttl)
    await remember_sent(rt, [(receipt.provider, receipt.message_id, SentRef(
        task.event.event_id, task.user_id, task.channel, target.target, target.address))
                             for target, _, receipt in sent], ttl)


def _attempts(task: ChannelTask, target: Target) -> int:
    """Provider calls already made for ``target`` (a scheduled retry carries them)."""
    return task.attempt if task.target == target.target else 0


def _record(rt: Runtime, task: ChannelTask, target: str, status: DeliveryStatus,
            reason: str | None = None, attempts: int = 0, digest: str | None = None
            ) -> DeliveryRecord:
    return DeliveryRecord(task.channel, target, status, reason, attempts, rt.now_ms(), digest)


async def _text(rt: Runtime, task: ChannelTask) -> tuple[str, str] | Exception:
    """The title and body every target of the task gets, or why there are none (each
    claimed target then fails with it: a render error is dead-lettered, anything else
    redoes the task)."""
    try:
        return await text_of(rt, task)
    except Exception as exc:
        return exc


async def _log(rt: Runtime, task: ChannelTask, target: str, status: DeliveryStatus,
               reason: str | None = None, attempts: int = 0, digest: str | None = None
               ) -> None:
    await rt.delivery.log.record(
        task.event.event_id, task.user_id,
        _record(rt, task, target, status, reason, attempts, digest),
        max(1, rt.ttl_left_s(task.event.created_at)))


async def fall_back(rt: Runtime, task: ChannelTask) -> bool:
    """Queue the delivery on the next channel of its chain the recipient allows (see the
    module); False when it has no chain, or nothing left in it."""
    notify = task.event.notify
    if task.via in ("fallback", "escalation"):
        chain = task.chain
    elif (task.via == "notify" and notify is not None
          and may_fall_back(notify.critical, task.event.priority, notify.fallback)):
        chain = fallback_chain(notify.fallback, task.channel)
    else:
        return False
    if not chain:
        return False
    prefs = await rt.recipients.preferences(task.user_id) or Preferences()
    chosen = next_channel(chain, lambda c: channel_allowed(prefs, task.event.kind, c))
    if chosen is None:
        return False
    channel, rest = chosen
    via: Literal["fallback", "escalation"] = (
        "escalation" if task.via == "escalation" else "fallback")
    await rt.queue.enqueue(task.event.priority, Envelope(
        ChannelTask(task.event, task.user_id, channel, task.locale, via=via, chain=rest),
        rt.now_ms()), queue=channel)
    log.info("delivery %s to %s falls back from %s to %s", task.event.event_id,
             task.user_id, task.channel, channel)
    return True


async def targets(rt: Runtime, task: ChannelTask) -> list[Target]:
    """The targets to send to; the ones that cannot be reached are logged here."""
    if task.channel == "push":
        devices = await rt.recipients.devices(task.user_id)
        if task.target is not None:
            devices = [d for d in devices if d.device_id == task.target]
        if not devices:
            await _log(rt, task, task.target or "push", "suppressed", "no_device")
            return []
        out = []
        for device in devices:
            if not device.active:
                await _log(rt, task, device.device_id, "suppressed", "inactive")
            elif device.platform == "webpush" and device.subscription is not None:
                keys = device.subscription.keys
                out.append(Target("webpush", device.device_id, device.subscription.endpoint,
                                  WebPushKeys(keys.p256dh, keys.auth), device))
            elif device.token is not None:
                out.append(Target(device.platform, device.device_id, device.token,
                                  device=device))
        return out
    contacts = await rt.recipients.contacts(task.user_id)
    address = None
    active = False
    if contacts is not None:
        address = contacts.phone if task.channel == "sms" else contacts.email
        active = contacts.phone_active if task.channel == "sms" else contacts.email_active
    if address is None:
        await _log(rt, task, task.channel, "suppressed", "no_contact")
        return []
    if not active:
        await _log(rt, task, task.channel, "suppressed", "inactive")
        return []
    kind: TargetKind = "sms" if task.channel == "sms" else "email"
    return [Target(kind, task.channel, address)]


async def text_of(rt: Runtime, task: ChannelTask) -> tuple[str, str]:
    """The notification's title and body for this recipient (RenderError if it cannot be
    rendered)."""
    notify = task.event.notify
    assert notify is not None
    if notify.message is not None:
        return notify.message.title, notify.message.body
    assert notify.template is not None
    template = await templates.get(rt, notify.template)
    if template is None:
        raise RenderError(notify.template, task.locale, "template", "no such template")
    event = task.event
    rendered = render(notify.template, template, task.locale, data=notify.data,
                      event=EventVars(event.event_id, event.author_id, event.kind,
                                      json.loads(event.payload)),
                      user_id=task.user_id)
    return rendered.title, rendered.body


def _data(task: ChannelTask, nid: str) -> dict[str, str]:
    """The flat string map a push message carries."""
    notify = task.event.notify
    extra = notify.data if notify is not None else {}
    out = {k: v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()}
    out.update({"notification_id": nid, "event_id": task.event.event_id})
    return out


async def _call_target(rt: Runtime, task: ChannelTask, target: Target,
                       text: tuple[str, str] | Exception | None, providers: Providers
                       ) -> Receipt | None:
    """The provider call of one claimed target: the receipt when the provider accepted;
    None when its breaker is open (no call); otherwise raises what went wrong."""
    if isinstance(text, Exception):
        raise text
    provider = providers.for_target(target.kind)
    assert provider is not None and text is not None
    breaker = rt.breakers.get(target.kind)
    if not breaker.allow(rt.now_ms() / 1000):
        return None
    nid = notification_id(task.event.event_id, task.user_id)
    title, body = text
    return await _call(rt, breaker, provider.send(Outgoing(
        key=f"{nid}:{task.channel}:{target.target}", kind=target.kind,
        address=target.address, title=title, body=body, data=_data(task, nid),
        priority=task.event.priority, webpush=target.webpush)))


async def _unsent(rt: Runtime, task: ChannelTask, target: Target, key: str, holder: str,
                  outcome: Exception | None) -> None:
    """A claimed target that did not go out: its claim released (else the lease runs out by
    itself), then a wait for its breaker (``None``), or what its failure leads to."""
    with contextlib.suppress(RetryableError):
        await rt.delivery.once.release(key, holder)
    attempts = _attempts(task, target)
    if outcome is None:
        await _breaker_open(rt, task, target, attempts, rt.breakers.get(target.kind))
    else:
        await _not_sent(rt, task, target, outcome, attempts)


async def _call(rt: Runtime, breaker: CircuitBreaker, call: Awaitable[Receipt]) -> Receipt:
    """The provider call, its outcome told to the provider's breaker: only an unavailable
    provider (connection, timeout, 5xx, 429) counts as a failure; a rejection or a dead
    target is the provider answering."""
    try:
        receipt = await call
    except ProviderUnavailable:
        breaker.record(False, rt.now_ms() / 1000)
        raise
    except Exception:
        breaker.record(True, rt.now_ms() / 1000)
        raise
    except BaseException:
        breaker.abandon()
        raise
    breaker.record(True, rt.now_ms() / 1000)
    return receipt


async def _breaker_open(rt: Runtime, task: ChannelTask, target: Target, attempts: int,
                        breaker: CircuitBreaker) -> None:
    """Fail fast: the next channel when the delivery may fall back, else wait (not counted
    as an attempt) until the breaker lets a probe through."""
    if await fall_back(rt, task):
        await _log(rt, task, target.target, "suppressed", "breaker_open_fallback", attempts)
        return
    now_s = rt.now_ms() / 1000
    retry_at = breaker.retry_at() or now_s + breaker.config.cooldown_s
    delay = max(0.0, retry_at - now_s) + random.uniform(0, BREAKER_SPREAD_S)
    await _log(rt, task, target.target, "scheduled", "breaker_open", attempts)
    await _reschedule(rt, task, target, attempts, delay)


async def _not_sent(rt: Runtime, task: ChannelTask, target: Target, exc: Exception,
                    attempts: int) -> None:
    """What a failed call leads to; anything but a provider's or the template's answer
    (a store or queue outage, a bug) is raised again, for the task to be redone."""
    metrics.delivery_failed(task.channel, target.kind, exc)
    if isinstance(exc, ProviderUnavailable):
        attempts += 1
        if attempts >= rt.settings.delivery_max_attempts:
            # A delivery that fell back is not also buried: replaying it from the dead
            # letters would then reach the user a second time, on the original channel.
            if await fall_back(rt, task):
                await _log(rt, task, target.target, "failed", "exhausted_fell_back", attempts)
            else:
                await _dead(rt, task, target, "exhausted", str(exc), attempts)
            return
        await _log(rt, task, target.target, "scheduled", exc.detail[:200], attempts)
        await _reschedule(rt, task, target, attempts, retry_delay(attempts, exc.retry_after))
    elif isinstance(exc, DeadTarget):
        await _deactivate(rt, task, target, exc.reason)
        await _log(rt, task, target.target, "failed", exc.reason, attempts + 1)
    elif isinstance(exc, ProviderRejected):
        await _dead(rt, task, target, "rejected", str(exc), attempts + 1)
    elif isinstance(exc, RenderError):
        await _dead(rt, task, target, "render_error", str(exc), attempts)
    else:
        raise exc


def _narrowed(task: ChannelTask, target: Target, attempts: int, now: int) -> Envelope:
    return Envelope(msgspec.structs.replace(task, target=target.target, attempt=attempts),
                    now)


async def _reschedule(rt: Runtime, task: ChannelTask, target: Target, attempts: int,
                      delay_s: float) -> None:
    now = rt.now_ms()
    await rt.queue.schedule(task.channel, task.event.priority,
                            _narrowed(task, target, attempts, now), now + int(delay_s * 1000))


async def _dead(rt: Runtime, task: ChannelTask, target: Target, reason: str, detail: str,
                attempts: int) -> None:
    """The delivery goes to the dead letters (``feedsvc dlq replay`` sends it again, unless
    it was sent meanwhile) and the log says ``dead`` with the reason."""
    await rt.queue.bury(task.channel, task.event.priority,
                        _narrowed(task, target, 0, rt.now_ms()), reason, detail)
    await _log(rt, task, target.target, "dead", reason, attempts)


async def _deactivate(rt: Runtime, task: ChannelTask, target: Target, reason: str) -> None:
    if target.device is not None:
        await rt.recipients.deactivate_device(task.user_id, target.device, reason)
    elif task.channel in ("sms", "email"):
        await deactivate_contact(rt.recipients, task.user_id,
                                 "sms" if task.channel == "sms" else "email", target.address)
