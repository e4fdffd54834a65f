"""Intake: accept one event from the posting service (``POST /v1/events``).

validate -> route by the author's reach -> store once (door dedup on event_id) -> write the
author's partition -> enqueue the fan-out task -> 202. Only the cheap, bounded work happens
here; everything proportional to an audience runs in the workers.

Nothing accepted is lost: the outbox row (``Outbox.record``) is written before the event
row (insert-if-absent, the door dedup), and once the event row is stored the answer is 202
whatever happens next. A failed enqueue (Redis down) or a crash before it leaves the event
in the outbox, and the sweeper (``feedsvc/sweeper.py``) queues it. A retry of a request that
died half way finds the row, sees the same body, finishes the remaining (idempotent) steps
and answers ``duplicate``. The answer is 503 only when the event could not be stored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, TypeVar

import msgspec

from feedsvc import logs
from feedsvc.errors import InvalidRequest, RetryableError, Unprocessable
from feedsvc.fanout import write_author_partition
from feedsvc.graph import refresh_mode
from feedsvc.model import (
    EVENT_ID_PATTERN,
    ID_PATTERN,
    ID_RULE,
    KIND_MAX,
    MAX_AUDIENCE,
    MAX_BULK_FOLLOWS,
    MAX_FUTURE_MS,
    MAX_NOTIFY_DATA_BYTES,
    MAX_PAYLOAD_BYTES,
    OBJECT_ID_MAX,
    RFC3339_PATTERN,
    Accepted,
    Envelope,
    Event,
    EventIn,
    FanoutTask,
    NotifyIn,
    Route,
)
from feedsvc.runtime import Runtime
from feedsvc.store.base import OUTBOX_TTL_S

__all__ = ["Accepted", "accept", "decode_body", "parse_body", "parse_created_at", "publish",
           "valid_id", "validate"]

log = logging.getLogger(__name__)

_ID = re.compile(ID_PATTERN)
_RFC3339 = re.compile(RFC3339_PATTERN)
S = TypeVar("S", bound=msgspec.Struct)

# What a client is told when a field breaks its rule (keyed by msgspec's path, list indices
# written as []); the limits themselves live on the Structs in feedsvc.model.
_RULES = {
    "event_id": f"event_id must match {EVENT_ID_PATTERN} (1-128 of A-Z a-z 0-9 . _ : -)",
    "author_id": f"author_id must be {ID_RULE}",
    "kind": f"kind must be a string of 1-{KIND_MAX} characters",
    "payload": "payload must be a JSON object",
    "created_at": "created_at must be an RFC 3339 date-time or epoch milliseconds",
    "priority": "priority must be one of high, medium, low",
    "object_id": f"object_id must be a string of 1-{OBJECT_ID_MAX} characters or null",
    "audience": "audience must be an object with a list of users",
    "audience.users": f"audience.users must list 1-{MAX_AUDIENCE} user ids",
    "audience.users[]": f"user ids are {ID_RULE}",
    "follows": f"follows must be a list of at most {MAX_BULK_FOLLOWS} follows",
    "follows[]": "each follow is an object with user_id and author_id",
    "follows[].user_id": f"user ids are {ID_RULE}",
    "follows[].author_id": f"author ids are {ID_RULE}",
}
# Lists past their maximum length answer with their own code.
_TOO_LONG = {"audience.users": "audience_too_large", "follows": "too_many"}


def valid_id(value: str) -> bool:
    """The one id rule (``feedsvc.model.ID_PATTERN``) for user and author ids."""
    return bool(_ID.search(value))


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> None:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen.add(key)


def decode_json(raw: bytes) -> Any:
    """Decode a request body; malformed JSON (including invalid UTF-8, absurd nesting or
    numbers, and an object naming a key twice) is a 400."""
    try:
        value = msgspec.json.decode(raw)
        # msgspec keeps the last of two equal keys: refuse them instead, or a caller that
        # checked the first would see its request act on the second.
        json.loads(raw, object_pairs_hook=_refuse_duplicates)
    except _DuplicateKey as exc:
        raise InvalidRequest(f"body names the key {exc.key!r} twice in one object",
                             code="duplicate_key") from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"body is not valid JSON: {exc}", code="invalid_json") from exc
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise InvalidRequest("body is not valid JSON (invalid UTF-8, a number out of range "
                             "or nesting too deep)", code="invalid_json") from exc
    return value


def field_error(exc: msgspec.ValidationError) -> Unprocessable:
    """Turn msgspec's validation error into a 422 naming the field by the path msgspec
    reports (``... - at `$.audience.users[3]```)."""
    message = str(exc)
    text, sep, where = message.rpartition(" - at `$")
    if not sep:
        text, where = message, ""
    path = where.rstrip("`").lstrip(".")
    code = "invalid_field"
    for marker, missing_code in (("missing required field `", "missing_field"),
                                 ("contains unknown field `", "unknown_field")):
        if marker in text:
            name = text.partition(marker)[2].rstrip("`")
            path = f"{path}.{name}" if path else name
            code = missing_code
            if code == "unknown_field":
                return Unprocessable(f"unknown field {path!r}", code=code, field=path)
            return Unprocessable(f"{path} is required", code=code, field=path)
    rule = re.sub(r"\[\d+\]", "[]", path)
    if rule in _TOO_LONG and "length <=" in text:
        code = _TOO_LONG[rule]
    return Unprocessable(_RULES.get(rule, message), code=code, field=path or None)


def decode_body(raw: bytes, into: type[S]) -> tuple[S, Any]:
    """Decode a JSON object body into the Struct ``into``; returns it and the JSON value."""
    value = decode_json(raw)
    if not isinstance(value, dict):
        raise InvalidRequest("body must be a JSON object", code="invalid_json")
    try:
        return msgspec.convert(value, into), value
    except msgspec.ValidationError as exc:
        raise field_error(exc) from exc


def parse_body(raw: bytes) -> tuple[EventIn, str]:
    """Decode and type-check the body; returns the event and the hash of its JSON value."""
    event, value = decode_body(raw, EventIn)
    body_hash = hashlib.sha256(msgspec.json.encode(value, order="sorted")).hexdigest()
    return event, body_hash


def parse_created_at(value: str | int | None, now_ms: int) -> int:
    """``created_at`` in epoch ms: exactly RFC 3339's date-time (upper or lower case T and Z,
    a leap second :60 counts as the next second), or epoch milliseconds."""
    if value is None:
        return now_ms
    if isinstance(value, int):
        return value
    bad = Unprocessable(_RULES["created_at"], code="invalid_field", field="created_at")
    match = _RFC3339.search(value)
    if not match:
        raise bad
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    fraction, zone = match.group(7), match.group(8)
    leap = second == 60
    try:
        if zone in ("Z", "z"):
            tz = UTC
        else:
            hours, minutes = int(zone[1:3]), int(zone[4:6])
            if hours > 23 or minutes > 59:
                raise ValueError("offset out of range")
            sign = -1 if zone[0] == "-" else 1
            tz = timezone(sign * timedelta(hours=hours, minutes=minutes))
        moment = datetime(year, month, day, hour, minute, 59 if leap else second, tzinfo=tz)
    except ValueError as exc:
        raise bad from exc
    ms = int(moment.timestamp()) * 1000 + (1000 if leap else 0)
    if fraction:
        ms += int(fraction[1:4].ljust(3, "0"))
    return ms


def validate(event: EventIn, now_ms: int, retention_ms: int) -> int:
    """Check what the Struct cannot state; returns created_at in epoch ms."""
    if len(msgspec.json.encode(event.payload)) > MAX_PAYLOAD_BYTES:
        raise Unprocessable(f"payload is larger than {MAX_PAYLOAD_BYTES} bytes encoded",
                            code="payload_too_large", field="payload")
    created_at = parse_created_at(event.created_at, now_ms)
    if created_at < now_ms - retention_ms:
        raise Unprocessable("created_at is older than the inbox retention", code="too_old",
                            field="created_at")
    if created_at > now_ms + MAX_FUTURE_MS:
        raise Unprocessable("created_at is more than 5 minutes in the future",
                            code="in_future", field="created_at")
    if event.notify is not None:
        check_notify(event.notify)
    return created_at


def check_notify(notify: NotifyIn) -> None:
    """Exactly one of ``template`` and ``message``; ``data`` at most 4 KiB encoded."""
    if (notify.template is None) == (notify.message is None):
        raise Unprocessable("notify needs exactly one of template and message",
                            code="invalid_field", field="notify")
    if len(msgspec.json.encode(notify.data)) > MAX_NOTIFY_DATA_BYTES:
        raise Unprocessable(f"notify.data is larger than {MAX_NOTIFY_DATA_BYTES} bytes "
                            "encoded", code="payload_too_large", field="notify.data")


async def accept(rt: Runtime, raw: bytes) -> tuple[int, Accepted]:
    """Accept one event. Returns (HTTP status, response body); raises ClientError."""
    now = rt.now_ms()
    incoming, body_hash = parse_body(raw)
    logs.bind(event_id=incoming.event_id)  # the request's log lines name it
    created_at = validate(incoming, now, rt.settings.retention_ms)
    erased = await rt.erased.get(rt)
    if incoming.author_id in erased:
        raise Unprocessable(f"user {incoming.author_id!r} was erased", code="user_erased",
                            field="author_id")
    route: Route
    if incoming.audience is not None:
        route = "direct"
    else:
        route = await refresh_mode(rt, incoming.author_id)
    template = incoming.notify.template if incoming.notify else None
    if template is not None and await rt.delivery.templates.template(template) is None:
        raise Unprocessable(f"no template named {template!r}", code="unknown_template",
                            field="notify.template")
    event = Event(
        event_id=incoming.event_id, author_id=incoming.author_id, kind=incoming.kind,
        created_at=created_at, priority=incoming.priority,
        payload=msgspec.json.encode(incoming.payload).decode(), route=route,
        # Taken now, after the reads above: the outbox row lands in the bucket of this
        # moment, which the sweeper's checkpoint has not passed (feedsvc/sweeper.py).
        accepted_at=rt.now_ms(), body_hash=body_hash, object_id=incoming.object_id,
        # Erased users are left out of a direct audience (feedsvc/erasure.py).
        audience=[u for u in dict.fromkeys(incoming.audience.users) if u not in erased]
        if incoming.audience else None,
        notify=incoming.notify,
    )
    ttl = rt.ttl_left_s(created_at, now)
    if ttl < 1:
        raise Unprocessable("created_at is older than the inbox retention", code="too_old",
                            field="created_at")
    # The outbox row first: a stored event is then never missing from it, whatever fails
    # or crashes after this point (the sweeper finishes the work).
    await rt.outbox.record(event.event_id, event.accepted_at, ttl)
    existing = await rt.store.insert_event(event, ttl)
    if existing is None:
        await publish(rt, event)
        return 202, Accepted(event.event_id, "accepted", event.route)
    if existing.body_hash != body_hash:
        raise Unprocessable("event_id was already used with a different body",
                            code="idempotency_key_reused", field="event_id")
    row = await rt.outbox.outbox_row(existing.event_id, existing.accepted_at)
    # No row: the first request died before recording it is impossible (it records first),
    # so the row has expired: an event that old was published long ago.
    fresh = existing.accepted_at > now - (OUTBOX_TTL_S - 86_400) * 1000
    if (row is None and fresh) or (row is not None and not (row.done or row.queued_at)):
        # The first request died before its task was queued: finish its work now rather
        # than wait for the sweeper.
        await publish(rt, existing)
    return 200, Accepted(existing.event_id, "duplicate")


async def publish(rt: Runtime, event: Event) -> None:
    """Make a stored event visible to pulls and queue its fan-out.

    The event is stored and in the outbox by now, so it is accepted whatever happens here:
    a step that fails (Redis or Cassandra unavailable) is logged and left to the fan-out
    worker, which writes the author's partition again, and to the outbox sweeper, which
    queues the task again. Nothing here makes the client see an error."""
    ttl = max(1, rt.ttl_left_s(event.created_at))
    try:
        await write_author_partition(rt, event, ttl)
    except RetryableError as exc:
        log.warning("event %s: author partition left to the worker: %s", event.event_id, exc)
    try:
        await rt.queue.enqueue(event.priority, Envelope(FanoutTask(event), rt.now_ms()))
        await rt.outbox.mark_queued(event.event_id, event.accepted_at, rt.now_ms(), ttl)
    except RetryableError as exc:
        log.warning("event %s: fan-out left to the outbox sweeper: %s", event.event_id, exc)
