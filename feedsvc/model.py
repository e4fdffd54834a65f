"""Wire and storage models (msgspec Structs) and the limits that bound them.

Everything that crosses a process boundary is a Struct here: the request body of
``POST /v1/events``, the stored ``Event``, inbox rows, queue tasks and cursors. Queue
entries outlive deploys, so new fields always get defaults (msgspec's evolution rules).
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

Priority = Literal["high", "medium", "low"]
Route = Literal["push", "pull", "direct"]
Mode = Literal["push", "pull"]
PRIORITIES: tuple[Priority, ...] = ("high", "medium", "low")  # drain order

MAX_BODY_BYTES = 64 * 1024
MAX_BULK_BODY_BYTES = 2 * 1024 * 1024  # 10,000 follows of 64-character ids fit
MAX_PAYLOAD_BYTES = 4 * 1024
MAX_AUDIENCE = 10_000
MAX_BULK_FOLLOWS = 10_000
MAX_FUTURE_MS = 5 * 60 * 1000
BACKFILL_EVENTS = 20
FOLLOWER_PAGE = 1_000
EVENT_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"


class Audience(msgspec.Struct, forbid_unknown_fields=True):
    users: list[str]


class EventIn(msgspec.Struct, forbid_unknown_fields=True):
    """The body of ``POST /v1/events`` exactly as a client sends it."""

    event_id: str
    author_id: str
    kind: str
    payload: dict[str, Any]
    created_at: str | int | None = None
    priority: Priority = "medium"
    object_id: str | None = None
    audience: Audience | None = None


class Event(msgspec.Struct, frozen=True):
    """An accepted event as stored once (``events_by_id``) and carried by fan-out tasks."""

    event_id: str
    author_id: str
    kind: str
    created_at: int  # epoch ms
    priority: Priority
    payload: str  # canonical JSON text of the payload object
    route: Route
    accepted_at: int  # epoch ms, when intake stored it
    body_hash: str
    object_id: str | None = None
    audience: list[str] | None = None


class InboxItem(msgspec.Struct, frozen=True):
    """One entry of a user's inbox, or of an author's partition, as the read merge sees it."""

    event_id: str
    author_id: str
    kind: str
    created_at: int
    priority: Priority
    payload: str
    object_id: str | None = None
    direct: bool = False

    @classmethod
    def of(cls, event: Event) -> InboxItem:
        return cls(
            event_id=event.event_id, author_id=event.author_id, kind=event.kind,
            created_at=event.created_at, priority=event.priority, payload=event.payload,
            object_id=event.object_id, direct=event.route == "direct",
        )


class Position(msgspec.Struct, frozen=True, array_like=True):
    """A place in newest-first order: items strictly after it are older."""

    created_at: int
    event_id: str


# --- queue tasks -------------------------------------------------------------------------


class FanoutTask(msgspec.Struct, tag="fanout", frozen=True):
    event: Event


class BackfillTask(msgspec.Struct, tag="backfill", frozen=True):
    """Copy the recent events of push authors into new followers' inboxes."""

    pairs: list[tuple[str, str]]  # (user_id, author_id)


class UnmergeTask(msgspec.Struct, tag="unmerge", frozen=True):
    """Remove the pushed rows of authors a user has unfollowed."""

    pairs: list[tuple[str, str]]


Task = FanoutTask | BackfillTask | UnmergeTask


class Envelope(msgspec.Struct, frozen=True):
    task: Task
    enqueued_at: int  # epoch ms


_envelope_encoder = msgspec.msgpack.Encoder()
_envelope_decoder = msgspec.msgpack.Decoder(Envelope)


def encode_envelope(envelope: Envelope) -> bytes:
    return _envelope_encoder.encode(envelope)


def decode_envelope(data: bytes) -> Envelope:
    return _envelope_decoder.decode(data)


# --- API responses -----------------------------------------------------------------------


class InboxEntryOut(msgspec.Struct):
    event_id: str
    author_id: str
    kind: str
    created_at: str
    priority: Priority
    object_id: str | None
    payload: msgspec.Raw
    via: Literal["push", "pull"]


class PageOut(msgspec.Struct):
    items: list[InboxEntryOut]
    next_cursor: str | None


class IdPageOut(msgspec.Struct):
    items: list[str]
    next_cursor: str | None


class UserOut(msgspec.Struct):
    user_id: str
    followers: int
    following: int
    celebrity: bool
