"""Ports of the state behind provider status webhooks, inbox read state and erasure.

- ``ProviderIds``: which delivery a provider's message id belongs to, recorded when the
  provider accepted the message (``feedsvc/delivery/send.py``) and looked up by
  ``POST /v1/providers/{provider}/status`` (``feedsvc/delivery/status.py``).
- ``SeenWebhooks``: Standard Webhooks ``webhook-id`` values seen within the tolerance
  window, so a replayed webhook changes nothing.
- ``ReadMarks``: the newest inbox position each user has seen (``feedsvc/readstate.py``).
- ``Erasures``: erased users (the tombstones every write path checks), the erasure job's
  progress, and the deletes it needs beyond the other ports (``feedsvc/erasure.py``).

Cassandra tables are in ``cql/005_receipts_reads_erasure.cql``; implementations in
``feedsvc/store/policy_cassandra.py`` and ``feedsvc/store/policy_sqlite.py`` (the embedded
file), on the feed store's session or file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import msgspec

from feedsvc.model import Channel, Position


class SentRef(msgspec.Struct, frozen=True):
    """One sent delivery, as a provider's message id names it."""

    event_id: str
    user_id: str
    channel: Channel
    target: str  # device id, "sms" or "email" (the delivery log's target)
    address: str  # the token, endpoint, number or address it went to


class ProviderIds(Protocol):
    async def remember_many(self, sent: Sequence[tuple[str, str, SentRef]],
                            ttl_s: int) -> None:
        """Upsert each (provider, message id, ref), in one request; also indexed by the
        recipient, for erasure."""

    async def find(self, provider: str, message_id: str) -> SentRef | None: ...

    async def forget_user(self, user_id: str) -> int:
        """Remove every message id of the user's deliveries; returns how many."""


class SeenWebhooks(Protocol):
    async def claim(self, provider: str, webhook_id: str, ttl_s: int) -> bool:
        """True when the id was not seen within ``ttl_s`` (it is now); atomic."""

    async def forget(self, provider: str, webhook_id: str) -> None:
        """Un-see an id whose processing failed, so the provider's retry is applied."""


class ReadMarks(Protocol):
    async def seen(self, user_id: str) -> Position | None: ...

    async def mark_seen(self, user_id: str, position: Position) -> None:
        """Set the position (callers keep it moving forward only)."""

    async def forget_seen(self, user_id: str) -> None: ...


ErasureState = Literal["queued", "running", "done"]


class ErasureStatus(msgspec.Struct, frozen=True):
    """``GET /v1/users/{u}/erasure``: where the job is and what it removed so far."""

    user_id: str
    state: ErasureState
    step: str  # the step running now (or "done")
    requested_at: int  # epoch ms
    updated_at: int
    removed: dict[str, int] = msgspec.field(default_factory=dict)  # per kind of data
    # Bumped when a stalled job is queued again: tasks of an older chain then stop, so a
    # slow batch taken for a lost one never leaves two chains running.
    generation: int = 0


class Erasures(Protocol):
    """Tombstones and the erasure job's progress, and the deletes no other port offers."""

    async def tombstone(self, user_id: str, erased_at: int) -> None: ...

    async def erased(self) -> dict[str, int]:
        """Every erased user -> when (epoch ms): small, read whole and cached."""

    async def status(self, user_id: str) -> ErasureStatus | None: ...

    async def set_pending(self, user_id: str, pending: bool) -> None:
        """Whether the user's erasure job is still to finish."""

    async def pending(self) -> list[str]:
        """Users whose erasure job has not finished (few: a row lives while a job runs)."""

    async def put_status(self, status: ErasureStatus) -> None: ...

    async def delete_contacts_and_preferences(self, user_id: str) -> None: ...

    async def delete_inbox(self, user_id: str) -> None:
        """The user's whole inbox."""

    async def delete_event(self, author_id: str, created_at: int, event_id: str) -> None:
        """One event everywhere it is stored once: its author's partition and its row by
        id (the door dedup key)."""

    async def index_direct(self, author_id: str, created_at: int, event_id: str,
                           ttl_s: int) -> None:
        """Record a direct event under its author (direct events have no partition)."""

    async def direct_events(self, author_id: str, limit: int) -> list[Position]: ...

    async def delete_direct(self, author_id: str, created_at: int, event_id: str) -> None:
        """A direct event's index row and its row by id."""

    async def delete_inbox_row(self, user_id: str, created_at: int, event_id: str) -> None:
        ...

    async def delivery_events(self, user_id: str, limit: int) -> list[str]:
        """Events the user has delivery log rows of (up to ``limit``)."""

    async def delete_deliveries(self, user_id: str, event_id: str) -> None:
        """The log of one notification, and its index row."""


@dataclass(frozen=True)
class PolicyState:
    receipts: ProviderIds
    webhooks: SeenWebhooks
    reads: ReadMarks
    erasures: Erasures
