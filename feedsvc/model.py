"""Wire and storage models (msgspec Structs) and the limits that bound them.

Everything that crosses a process boundary is a Struct here: the request body of
``POST /v1/events``, the stored ``Event``, inbox rows, queue tasks and cursors. Queue
entries outlive deploys, so new fields always get defaults (msgspec's evolution rules).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

Priority = Literal["high", "medium", "low"]
Channel = Literal["push", "sms", "email"]
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


def _whole(body: str) -> str:
    """A pattern matching the whole string in Python (whose ``$`` also matches before a final
    newline, and msgspec searches with ``re.search``) and in ECMA-262 alike."""
    return f"^(?!.*\\n){body}$"


EVENT_ID_PATTERN = _whole(r"[A-Za-z0-9._:-]{1,128}")

# The one id rule (user and author ids, in bodies, paths and queries): 1-64 characters, not
# starting with '.' (so never '.' or '..'), and none of: '/', whitespace, C0/C1 control
# characters, DEL, zero-width characters and bidi controls (which make two different ids
# look alike, or reorder the text around them). Written with \u escapes only, so the same
# text is a Python and an ECMA-262 (OpenAPI) pattern.
_ID_EXCLUDED = (
    "/\\u0000-\\u0020\\u007f-\\u00a0\\u061c\\u1680\\u180e\\u2000-\\u200f\\u2028-\\u202f"
    "\\u205f-\\u206f\\u3000\\ufeff"
)
ID_PATTERN = _whole(f"[^.{_ID_EXCLUDED}][^{_ID_EXCLUDED}]{{0,63}}")
ID_RULE = ("1-64 characters, not starting with '.', without '/', spaces, control, "
           "zero-width or bidi characters")
# Cursors are unpadded URL-safe base64 (the longest an inbox cursor can be is ~1.2 KiB).
CURSOR_PATTERN = _whole(r"[A-Za-z0-9_-]{1,2048}")
KIND_MAX = 64
OBJECT_ID_MAX = 128
# created_at as RFC 3339 date-time (section 5.6); ranges are checked by intake.
RFC3339_PATTERN = _whole(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]{1,9})?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})"
)
EPOCH_MS_MAX = 2**53 - 1

UserId = Annotated[str, msgspec.Meta(pattern=ID_PATTERN, min_length=1, max_length=64,
                                     description=ID_RULE)]
EventId = Annotated[str, msgspec.Meta(pattern=EVENT_ID_PATTERN, min_length=1, max_length=128)]
Kind = Annotated[str, msgspec.Meta(min_length=1, max_length=KIND_MAX)]
ObjectId = Annotated[str, msgspec.Meta(min_length=1, max_length=OBJECT_ID_MAX,
                                       description="events sharing it collapse in inboxes")]
CreatedAtText = Annotated[str, msgspec.Meta(pattern=RFC3339_PATTERN,
                                            description="RFC 3339 date-time")]
CreatedAtMs = Annotated[int, msgspec.Meta(ge=0, le=EPOCH_MS_MAX, description="epoch ms")]
Payload = Annotated[dict[str, Any], msgspec.Meta(
    description=f"any JSON object, at most {MAX_PAYLOAD_BYTES} bytes encoded")]
MAX_NOTIFY_DATA_BYTES = 4 * 1024
TEMPLATE_NAME_PATTERN = _whole(r"[A-Za-z0-9._-]{1,64}")
TemplateName = Annotated[str, msgspec.Meta(pattern=TEMPLATE_NAME_PATTERN, min_length=1,
                                           max_length=64)]


class MessageIn(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A notification's text given inline (instead of a template)."""

    title: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    body: Annotated[str, msgspec.Meta(max_length=4096)]


MAX_ESCALATE_AFTER_S = 7 * 86_400


class EscalateIn(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """``notify.escalate``: if the push is not opened within ``after`` seconds, send once
    on the first of ``to`` the recipient allows."""

    after: Annotated[int, msgspec.Meta(ge=1, le=MAX_ESCALATE_AFTER_S)]
    to: Annotated[list[Channel], msgspec.Meta(min_length=1, max_length=3)]


class NotifyIn(msgspec.Struct, forbid_unknown_fields=True, frozen=True, omit_defaults=True):
    """``notify`` of ``POST /v1/events``: notify the event's audience on these channels, with
    a stored template or an inline message (exactly one). Stored and queued without the
    fields left at their defaults, so a worker of the release before a new field was added
    still decodes the events that do not use it."""

    channels: Annotated[list[Channel], msgspec.Meta(min_length=1, max_length=3)]
    template: TemplateName | None = None
    message: MessageIn | None = None
    data: Annotated[dict[str, Any], msgspec.Meta(
        description=f"template variables, at most {MAX_NOTIFY_DATA_BYTES} bytes "
                    "encoded")] = msgspec.field(default_factory=dict)
    critical: bool = False  # bypasses quiet hours and rate limits
    # Delivery policy (feedsvc/delivery/policy.py): where a critical or high-priority
    # delivery goes when its channel cannot take it, in order; and escalation.
    fallback: Annotated[list[Channel], msgspec.Meta(max_length=3)] = msgspec.field(
        default_factory=list)
    escalate: EscalateIn | None = None


class Audience(msgspec.Struct, forbid_unknown_fields=True):
    users: Annotated[list[UserId], msgspec.Meta(min_length=1, max_length=MAX_AUDIENCE)]


class EventIn(msgspec.Struct, forbid_unknown_fields=True):
    """The body of ``POST /v1/events`` exactly as a client sends it."""

    event_id: EventId
    author_id: UserId
    kind: Kind
    payload: Payload
    created_at: CreatedAtText | CreatedAtMs | None = None
    priority: Priority = "medium"
    object_id: ObjectId | None = None
    audience: Audience | None = None
    notify: NotifyIn | None = None


class FollowIn(msgspec.Struct, forbid_unknown_fields=True):
    user_id: UserId
    author_id: UserId


class BulkIn(msgspec.Struct, forbid_unknown_fields=True):
    """The body of ``POST /v1/follows/bulk``."""

    follows: Annotated[list[FollowIn], msgspec.Meta(max_length=MAX_BULK_FOLLOWS)]


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
    notify: NotifyIn | None = None  # notify.data kept as decoded JSON


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


class NotifyTask(msgspec.Struct, tag="notify", frozen=True):
    """Notify one page of the event's audience, from ``after`` (a followers-page
    continuation, or for a direct event the index into its audience), then queue the next
    page's task: a page at a time, resumable, with bounded memory."""

    event: Event
    after: str | None = None


class ChannelTask(msgspec.Struct, tag="channel", frozen=True):
    """One recipient's notification on one channel (``feedsvc/delivery/send.py``): every
    active target of the channel, or with ``target`` just that one (a scheduled retry)."""

    event: Event
    user_id: str
    channel: Channel
    locale: str = "en"
    target: str | None = None
    attempt: int = 0  # provider calls already made for ``target``
    # Why this delivery exists: the notification itself, a fallback or an escalation from
    # another channel, or a window's digest; ``chain`` is where it goes next when this
    # channel cannot take it (``feedsvc/delivery/policy.py``).
    via: Literal["notify", "fallback", "escalation", "digest"] = "notify"
    chain: tuple[Channel, ...] = ()


class DigestTask(msgspec.Struct, tag="digest", frozen=True):
    """At the end of a rate window: one delivery of everything held for it."""

    user_id: str
    channel: Channel
    window_start: int  # epoch ms
    window_end: int
    locale: str = "en"


class EscalateTask(msgspec.Struct, tag="escalate", frozen=True):
    """``notify.escalate.after`` seconds after the push: unless the recipient opened it,
    send on the next channel."""

    event: Event
    user_id: str
    locale: str = "en"


class EraseTask(msgspec.Struct, tag="erase", frozen=True):
    """One step of erasing a user (``feedsvc/erasure.py``): a batch of ``step``, then the
    task of the next batch is queued."""

    user_id: str
    step: str
    generation: int = 0  # the job's (ErasureStatus.generation) when this task was queued


Task = (FanoutTask | BackfillTask | UnmergeTask | NotifyTask | ChannelTask | EraseTask
        | DigestTask | EscalateTask)


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


class Accepted(msgspec.Struct, omit_defaults=True):
    event_id: str
    status: Literal["accepted", "duplicate"]
    route: Route | None = None


class BulkOut(msgspec.Struct):
    applied: int


class StatusOut(msgspec.Struct):
    status: Literal["ok", "ready"]


class ErrorBody(msgspec.Struct):
    code: str
    message: str
    field: str | None = None


class ErrorOut(msgspec.Struct):
    error: ErrorBody
