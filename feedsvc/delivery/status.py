"""Provider status webhooks: what happened to a message after the provider accepted it.

Where it sits: after ``send.py``. When a provider accepts a message, ``remember_sent``
records its message id (``ProviderIds``); later the provider calls back:

- ``POST /v1/providers/twilio/status``: Twilio's status callback (form ``MessageSid``,
  ``MessageStatus``, ``ErrorCode``), signed with ``X-Twilio-Signature``: base64 of an
  HMAC-SHA1, keyed by the auth token, over the URL Twilio called followed by every form
  parameter's name and value, sorted by name (``twilio_signature``).
- ``POST /v1/providers/{provider}/status``: any other provider (or a relay in front of
  it) under the Standard Webhooks scheme: ``webhook-signature`` holds ``v1,<base64>``
  HMAC-SHA256 signatures, keyed by the base64 after ``whsec_``, of
  ``<webhook-id>.<webhook-timestamp>.<body>``; a timestamp more than 5 minutes off is
  refused, and a ``webhook-id`` seen before is answered but not applied again
  (``SeenWebhooks``). The body: ``{"type": "message.delivered" | "message.undelivered" |
  "message.bounced" | "message.opened", "data": {"message_id", "bounce": "hard" |
  "soft", "reason"}}``.

``apply_status`` moves the delivery log record of that delivery on (``next_status``: an
opened message is never marked delivered again, a late "delivered" never hides a bounce)
and, for a hard bounce or a Twilio number that can never receive (21610 opted out, 21211,
21614), deactivates that contact or device as a failed send would. Everything here but
``apply_status`` and ``remember_sent`` is pure.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
from collections.abc import Iterable, Sequence
from typing import Annotated, Literal

import msgspec

from feedsvc.delivery.providers.sms import DEAD_CODES
from feedsvc.delivery.recipients import deactivate_contact
from feedsvc.delivery.state import DeliveryRecord, DeliveryStatus
from feedsvc.errors import Forbidden, RetryableError
from feedsvc.runtime import Runtime
from feedsvc.store.policy import SentRef

log = logging.getLogger(__name__)

TOLERANCE_S = 5 * 60  # Standard Webhooks: a timestamp further off is refused
SEEN_TTL_S = 2 * TOLERANCE_S + 60  # a webhook-id is remembered while it could be replayed
Reported = Literal["delivered", "undelivered", "bounced", "opened"]

# Twilio's MessageStatus values that say something final; the others (queued, sending,
# sent, accepted, scheduled, ...) are steps on the way and change nothing.
TWILIO_STATUSES: dict[str, Reported] = {
    "delivered": "delivered", "undelivered": "undelivered", "failed": "undelivered",
    "read": "opened",
}


# --- signatures (pure) --------------------------------------------------------------------


def twilio_signature(url: str, params: Iterable[tuple[str, str]], auth_token: str) -> str:
    """Twilio's request signature: the full URL, then each parameter's name and value
    (sorted by name, then value, for repeated names), HMAC-SHA1 with the auth token."""
    text = url + "".join(name + value for name, value in sorted(params))
    digest = hmac.new(auth_token.encode(), text.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def check_twilio(signature: str | None, url: str, params: Iterable[tuple[str, str]],
                 auth_token: str) -> None:
    """Raise Forbidden unless ``signature`` is Twilio's for this request."""
    expected = twilio_signature(url, params, auth_token)
    # aiohttp hands undecodable header bytes on as surrogates: refuse them before encoding.
    if not signature or not signature.isascii() or not hmac.compare_digest(
            signature.encode(), expected.encode()):
        raise Forbidden("X-Twilio-Signature does not match this request", code="bad_signature")


def webhook_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret."""
    return base64.b64decode(secret.removeprefix("whsec_"))


def sign_webhook(key: bytes, webhook_id: str, timestamp: int | str, body: bytes) -> str:
    """The ``v1,<base64>`` signature of one webhook (for tests and relays)."""
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def check_webhook(key: bytes, webhook_id: str | None, timestamp: str | None,
                  signatures: str | None, body: bytes, now_s: float) -> None:
    """Raise Forbidden unless one of the space-separated ``v1,`` signatures is this body's
    and the timestamp is within ``TOLERANCE_S`` of ``now_s``."""
    if not webhook_id or not timestamp or not signatures:
        raise Forbidden("webhook-id, webhook-timestamp and webhook-signature are required",
                        code="bad_signature")
    if not (webhook_id.isascii() and signatures.isascii()):
        raise Forbidden("webhook-id and webhook-signature must be ASCII", code="bad_signature")
    if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12):
        raise Forbidden("webhook-timestamp must be integer Unix seconds", code="bad_signature")
    if abs(now_s - int(timestamp)) > TOLERANCE_S:
        raise Forbidden("webhook-timestamp is more than 5 minutes off", code="stale_webhook")
    expected = sign_webhook(key, webhook_id, timestamp, body).encode()
    for candidate in signatures.split():
        if hmac.compare_digest(candidate.encode(), expected):
            return
    raise Forbidden("webhook-signature does not match this request", code="bad_signature")


# --- what a status does (pure) -------------------------------------------------------------


def next_status(current: DeliveryStatus | None, reported: Reported) -> DeliveryStatus | None:
    """The log's new status, or None when the report changes nothing: an opened message
    stays opened; a bounce or undelivered is not hidden by a late delivered; a report
    repeated is nothing new."""
    if current == reported or current == "opened":
        return None
    if reported == "delivered" and current in ("bounced", "undelivered"):
        return None
    return reported


class StatusData(msgspec.Struct):
    message_id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    bounce: Literal["hard", "soft"] = "hard"
    reason: Annotated[str, msgspec.Meta(max_length=200)] | None = None


class StatusEvent(msgspec.Struct):
    """The Standard Webhooks body: ``type`` names what happened (others are ignored)."""

    type: Annotated[str, msgspec.Meta(max_length=64)]
    data: StatusData
    timestamp: str | None = None


STANDARD_TYPES: dict[str, Reported] = {
    "message.delivered": "delivered", "message.undelivered": "undelivered",
    "message.bounced": "bounced", "message.opened": "opened",
}


class StatusOut(msgspec.Struct):
    """What a status callback is answered: ``applied`` (the log moved on), ``unchanged``,
    ``ignored`` (a step on the way, an unknown type), ``unknown_message`` or
    ``duplicate`` (a webhook-id seen before)."""

    result: Literal["applied", "unchanged", "ignored", "unknown_message", "duplicate"]
    status: DeliveryStatus | None = None


# --- I/O ------------------------------------------------------------------------------------


async def remember_sent(rt: Runtime, sent: Sequence[tuple[str, str, SentRef]],
                        ttl_s: int) -> None:
    """Providers accepted these deliveries (provider, message id, what was sent): each
    message id names its delivery from now on. The sends are done whatever happens here:
    a store outage only costs those messages' status reports (``unknown_message``)."""
    sent = [item for item in sent if item[1]]
    if not sent:
        return
    try:
        await rt.policy.receipts.remember_many(sent, max(1, ttl_s))
    except RetryableError as exc:
        log.warning("%d message ids of %s not recorded: %s", len(sent),
                    ", ".join(sorted({p for p, _, _ in sent})), exc)


async def apply_status(rt: Runtime, provider: str, message_id: str, reported: Reported,
                       reason: str | None, disable: bool) -> StatusOut:
    """Move the delivery named by ``message_id`` on; ``disable`` deactivates its contact
    or device (a hard bounce, an opted-out number)."""
    ref = await rt.policy.receipts.find(provider, message_id)
    if ref is None or ref.user_id in await rt.erased.get(rt):
        return StatusOut("unknown_message")
    if disable:
        await _disable(rt, ref, reason or reported)
    records = await rt.delivery.log.records(ref.event_id, ref.user_id)
    current = next((r for r in records if (r.channel, r.target) == (ref.channel, ref.target)),
                   None)
    status = next_status(current.status if current else None, reported)
    if status is None:
        return StatusOut("unchanged", current.status if current else None)
    base = current or DeliveryRecord(ref.channel, ref.target, "sent", attempts=1)
    record = msgspec.structs.replace(base, status=status, reason=reason,
                                     updated_at=rt.now_ms())
    event = await rt.store.get_event(ref.event_id)
    ttl = rt.ttl_left_s(event.created_at) if event is not None else 86_400
    await rt.delivery.log.record(ref.event_id, ref.user_id, record, max(1, ttl))
    log.debug("%s %s: %s", provider, message_id, status)
    return StatusOut("applied", status)


async def _disable(rt: Runtime, ref: SentRef, reason: str) -> None:
    if ref.channel in ("sms", "email"):
        await deactivate_contact(rt.recipients, ref.user_id,
                                 "sms" if ref.channel == "sms" else "email", ref.address)
        return
    for device in await rt.recipients.devices(ref.user_id):
        sent_to = device.subscription.endpoint if device.subscription else device.token
        if device.device_id == ref.target and sent_to == ref.address:
            await rt.recipients.deactivate_device(ref.user_id, device, reason)


def twilio_disables(error_code: str | None) -> bool:
    """A Twilio error code that means the number can never receive (21610: opted out)."""
    # isascii first: "²".isdigit() is true and int() refuses it; int() of a long digit
    # string is slow, and past 4,300 digits it raises.
    return bool(error_code and len(error_code) <= 9 and error_code.isascii()
                and error_code.isdigit() and int(error_code) in DEAD_CODES)


def standard_key(secrets: Iterable[tuple[str, str]], provider: str) -> bytes | None:
    for name, secret in secrets:
        if name == provider:
            try:
                return webhook_key(secret)
            except (binascii.Error, ValueError):
                return None
    return None
