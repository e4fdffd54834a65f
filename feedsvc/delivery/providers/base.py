"""The provider port: send one rendered message to one target, once.

Channel workers (``delivery/send.py``) sit before this module; a provider's wire protocol
sits after it. A worker builds an ``Outgoing`` per delivery and calls ``Provider.send``,
which either returns a ``Receipt`` (the provider accepted the message) or raises one of
three errors from ``feedsvc.errors``, each naming what the worker should do next:

=====================  ===============================================================
outcome                the worker
=====================  ===============================================================
``Receipt``            marks the delivery sent (``message_id`` is the provider's id)
``ProviderUnavailable`` schedules a retry, waiting at least ``retry_after`` seconds
                       when the provider said so (connection errors, timeouts, 5xx, 429)
``ProviderRejected``   dead-letters the delivery: the provider will never take it
``DeadTarget``         deactivates the device or contact with ``reason``; no retry
=====================  ===============================================================

Failures are exceptions rather than a result union so that the same tree the rest of
feedsvc uses (``RetryableError`` / ``PermanentError``) sorts them, and an unexpected bug
still surfaces as an ordinary exception. Every request carries ``Idempotency-Key:
<delivery key>``; identifiers the provider shows (``apns-id``, SMTP ``Message-ID``) are
derived from the same key so that a repeated call is recognisable as a repeat.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Literal, Protocol

import msgspec

from feedsvc.model import Priority

Channel = Literal["push", "sms", "email"]
# What a target is, and so which adapter sends to it: a device's platform, or a contact.
TargetKind = Literal["fcm", "apns", "webpush", "sms", "email"]
CHANNEL_OF: dict[TargetKind, Channel] = {
    "fcm": "push", "apns": "push", "webpush": "push", "sms": "sms", "email": "email",
}
IDEMPOTENCY_HEADER = "Idempotency-Key"
# Namespace of the UUIDs derived from delivery keys (apns-id): fixed forever, so the same
# key always gives the same id across processes and deploys.
_KEY_NAMESPACE = uuid.UUID("6f1c2a52-3f0e-4c54-9a8e-1d2b1d6a0c11")


class WebPushKeys(msgspec.Struct, frozen=True):
    """A browser subscription's keys (base64url, as the browser's PushSubscription gives)."""

    p256dh: str
    auth: str


class Outgoing(msgspec.Struct, frozen=True):
    """One rendered message for one target: what a provider adapter needs, and no more.

    ``address`` is the FCM or APNs device token, the Web Push endpoint URL, the E.164 phone
    number or the email address. ``data`` is a flat string map carried with a push message
    (``notification_id``, ``event_id``, and the event's ``notify.data`` stringified).
    """

    key: str  # the delivery key: notification_id:channel:target
    kind: TargetKind
    address: str
    title: str
    body: str
    data: dict[str, str] = {}
    priority: Priority = "medium"
    webpush: WebPushKeys | None = None  # required when kind == "webpush"


class Receipt(msgspec.Struct, frozen=True):
    """The provider accepted the message."""

    provider: str
    message_id: str


class Provider(Protocol):
    """One provider adapter. ``send`` is safe to call concurrently; ``aclose`` releases what
    the adapter opened (not a shared HTTP client it was given)."""

    name: str

    async def send(self, message: Outgoing) -> Receipt:
        """Deliver ``message`` or raise ProviderUnavailable, ProviderRejected or DeadTarget."""
        ...

    async def aclose(self) -> None: ...


def key_uuid(key: str) -> uuid.UUID:
    """The UUID derived from a delivery key (used as ``apns-id``)."""
    return uuid.uuid5(_KEY_NAMESPACE, key)


def key_digest(key: str) -> str:
    """A short hex digest of a delivery key, for ids that must not carry the key verbatim."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]
