"""The storage port: what intake, fan-out, the graph and the read merge need from a store.

Two implementations pass one contract suite (``tests/test_store_contract.py``):
``CassandraStore`` (production) and ``SqliteStore`` (embedded). Every write a retry can
repeat is an upsert on a key the retry reproduces, so at-least-once work never duplicates.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol

import msgspec

from feedsvc.model import Event, InboxItem, Mode, Position

# The outbox indexes accepted events by the 10-second bucket of their accepted_at. A row
# lives at most OUTBOX_TTL_S: workers stopped for longer than that leave the events
# accepted before the stop to be fanned out by a client's retry, not by the sweeper.
OUTBOX_BUCKET_MS = 10_000
OUTBOX_TTL_S = 7 * 86_400


class Store(Protocol):
    # --- lifecycle ---------------------------------------------------------------------
    async def ping(self) -> None:
        """Raise RetryableError unless the store answers a query."""

    async def close(self) -> None: ...

    # --- events ------------------------------------------------------------------------
    async def insert_event(self, event: Event, ttl_s: int) -> Event | None:
        """Store ``event`` unless its event_id exists. Returns the existing event, or None
        when this call stored it. Atomic: of two racing inserts exactly one returns None."""

    async def get_event(self, event_id: str) -> Event | None: ...

    async def put_author_event(self, item: InboxItem, ttl_s: int) -> None:
        """Upsert the event into its author's time-bucketed partition."""

    async def author_events(
        self, author_id: str, before: Position | None, limit: int, since_ms: int
    ) -> list[InboxItem]:
        """The author's events newest first, strictly older than ``before``, created at or
        after ``since_ms``."""

    async def touch_pull_author(self, author_id: str, ttl_s: int) -> None:
        """Record that ``author_id`` has pull-routed events for the next ``ttl_s``."""

    async def pull_authors(self) -> dict[str, int]:
        """Authors with retained pull-routed events -> last time one was accepted (ms)."""

    # --- inboxes -----------------------------------------------------------------------
    async def write_inbox(self, user_ids: Sequence[str], item: InboxItem, ttl_s: int) -> None:
        """Upsert one row for ``item`` into each user's inbox."""

    async def read_inbox(
        self, user_id: str, before: Position | None, limit: int
    ) -> list[InboxItem]: ...

    async def delete_inbox_author(self, user_id: str, author_id: str) -> int:
        """Delete the non-direct rows of ``author_id`` from one inbox; returns how many."""

    async def trim_inbox(self, user_id: str, keep: int) -> int:
        """Drop everything older than the ``keep`` newest rows; returns rows dropped (or -1
        when the store trims with one range deletion and cannot count)."""

    # --- follow graph ------------------------------------------------------------------
    async def follow(self, user_id: str, author_id: str) -> bool:
        """Add the edge; True when it was new (counts changed)."""

    async def unfollow(self, user_id: str, author_id: str) -> bool: ...

    async def following_subset(self, user_id: str, author_ids: Sequence[str]) -> set[str]:
        """Which of ``author_ids`` the user follows."""

    async def followers_page(
        self, author_id: str, after: str | None, limit: int
    ) -> tuple[list[str], str | None]:
        """One page of followers and an opaque continuation (None at the end)."""

    def follower_pages(self, author_id: str, page_size: int) -> AsyncIterator[list[str]]:
        """Every follower once, in no particular order, in pages of ``page_size`` (only the
        last may be shorter, so a store's shards never cut a page short); fan-out's reader:
        shards are read concurrently where the store has them."""

    async def following_page(
        self, user_id: str, after: str | None, limit: int
    ) -> tuple[list[str], str | None]: ...

    async def counts(self, user_id: str) -> tuple[int, int]:
        """(followers, following)."""

    async def get_mode(self, author_id: str) -> Mode: ...

    async def set_mode(self, author_id: str, mode: Mode) -> None: ...


def outbox_bucket(accepted_at_ms: int) -> int:
    return accepted_at_ms // OUTBOX_BUCKET_MS


def outbox_ttl(ttl_s: int) -> int:
    """An outbox row's TTL: the event's retention left, at most ``OUTBOX_TTL_S``."""
    return max(1, min(ttl_s, OUTBOX_TTL_S))


class OutboxRow(msgspec.Struct, frozen=True):
    event_id: str
    queued_at: int | None  # epoch ms of the last time its fan-out task was queued
    done: bool  # fan-out completed (or dead-lettered): the sweeper leaves it alone


class Outbox(Protocol):
    """Which accepted events still owe a fan-out (``feedsvc/sweeper.py`` reads it).

    Intake records an event here before it stores the event itself, so no stored event
    is missing from the outbox; the worker settles it once the fan-out is complete. Rows
    are found by (bucket of accepted_at, event_id); all writes are upserts."""

    async def record(self, event_id: str, accepted_at: int, ttl_s: int) -> None:
        """An event is about to be stored (written before ``Store.insert_event``)."""

    async def mark_queued(self, event_id: str, accepted_at: int, queued_at: int,
                          ttl_s: int) -> None:
        """Its fan-out task was put on the queue at ``queued_at``."""

    async def settle(self, event_id: str, accepted_at: int, ttl_s: int) -> None:
        """Its fan-out is complete (or dead-lettered): nothing more is owed."""

    async def outbox_row(self, event_id: str, accepted_at: int) -> OutboxRow | None: ...

    async def outbox_bucket(self, bucket: int) -> list[OutboxRow]:
        """Every row of one bucket (the bucket's events, whatever their state)."""

    async def sweep_checkpoint(self) -> int | None:
        """The oldest bucket that may still hold an unsettled event (None: never swept)."""

    async def set_sweep_checkpoint(self, bucket: int) -> None: ...


class BackendStore(Store, Outbox, Protocol):
    """What ``open_store`` returns: both stores keep the outbox beside the feed's data."""
