"""Delivery state: the ports the notify fan-out and the channel workers keep it behind.

- ``TemplateStore``: notification templates by name (``PUT/GET /v1/templates/{name}``).
- ``DeliveryLog``: one record per (notification, channel, target), upserted as the
  delivery moves on (``GET /v1/events/{e}/deliveries/{u}``).
- ``SendOnce``: the claim a worker holds on a delivery key while it calls the provider,
  and the mark that the key was sent, so nothing is sent twice.
- ``PolicyState``: the delivery policy's shared state (``feedsvc/delivery/policy.py``):
  arrivals per rate window, the deliveries held for a window's digest, and marks (a
  notification opened).

Templates and the log live beside the feed's store (Cassandra or the embedded file,
``feedsvc/store/delivery_*.py``); send-once claims beside the queue (Redis or the embedded
queue file, ``feedsvc/queue/sendonce_*.py``); policy state too (``policy_*.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import msgspec

from feedsvc.delivery.templates import Template
from feedsvc.model import Channel

DeliveryStatus = Literal["queued", "scheduled", "sent", "failed", "dead", "suppressed",
                         # reported later by the provider (POST /v1/providers/.../status)
                         "delivered", "undelivered", "bounced", "opened"]
ClaimState = Literal["claimed", "sent", "busy"]
SENT_TTL_S = 7 * 86_400  # how long a sent key is remembered (a replay after that re-sends)


class DeliveryRecord(msgspec.Struct, frozen=True):
    """One delivery as the log shows it; ``target`` is the device id for push, ``sms`` or
    ``email`` for the others, or the channel name when no target was resolved."""

    channel: Channel
    target: str
    status: DeliveryStatus
    reason: str | None = None
    attempts: int = 0  # provider calls made
    updated_at: int = 0  # epoch ms
    digest: str | None = None  # held for the digest with this notification id (``digested``)


class TemplateStore(Protocol):
    async def put_template(self, name: str, template: Template) -> None: ...

    async def template(self, name: str) -> Template | None: ...


class DeliveryLog(Protocol):
    """Keyed by (event_id, user_id), not by the notification id's text: ids may contain
    ``:``, so ``event:user`` alone could name two notifications."""

    async def record(self, event_id: str, user_id: str, record: DeliveryRecord,
                     ttl_s: int) -> None:
        """Upsert the record of (notification, channel, target)."""

    async def record_many(self, event_id: str, user_id: str,
                          records: Sequence[DeliveryRecord], ttl_s: int) -> None:
        """Upsert several records of one notification in one request."""

    async def records(self, event_id: str, user_id: str) -> list[DeliveryRecord]:
        """Every record of one notification, by channel then target."""


class SendOnce(Protocol):
    async def claim(self, key: str, holder: str, lease_s: float) -> ClaimState:
        """``claimed`` (the caller may send, for ``lease_s``), ``sent`` (never again) or
        ``busy`` (another worker holds the lease)."""

    async def claim_many(self, keys: Sequence[str], holder: str, lease_s: float
                         ) -> list[ClaimState]:
        """``claim`` of each key, in one round trip; the states in the keys' order."""

    async def mark_sent_many(self, keys: Sequence[str]) -> None:
        """``mark_sent`` of each key, in one round trip."""

    async def release(self, key: str, holder: str) -> None:
        """Drop the caller's lease (the send failed): the key may be claimed again."""

    async def forget(self, key: str) -> None:
        """Drop the key whatever its state (erasure)."""


class PolicyState(Protocol):
    """Shared by every worker; every write is idempotent (a task redone repeats it)."""

    async def arrive(self, window: str, member: str, ttl_s: float) -> int:
        """``member``'s 1-based order of arrival in ``window`` (the first one's again for a
        member that arrived before); the window is forgotten ``ttl_s`` after its first."""

    async def hold(self, window: str, order: int, item: bytes, ttl_s: float) -> None:
        """Keep ``item`` (what arrived ``order``-th) for the window's digest."""

    async def held(self, window: str) -> list[bytes]:
        """Everything held for ``window``, in order of arrival."""

    async def mark(self, key: str, ttl_s: float) -> None: ...

    async def marked(self, key: str) -> bool: ...


@dataclass(frozen=True)
class DeliveryState:
    templates: TemplateStore
    log: DeliveryLog
    once: SendOnce
    policy_state: PolicyState  # quiet hours, rate windows, escalation (delivery/policy.py)
