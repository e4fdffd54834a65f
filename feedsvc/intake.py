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
import logging
import re
from datetime import datetime
from typing import Any, Literal

import msgspec

from feedsvc.errors import InvalidRequest, RetryableError, Unprocessable
from feedsvc.fanout import write_author_partition
from feedsvc.graph import refresh_mode
from feedsvc.model import (
    EVENT_ID_PATTERN,
    MAX_AUDIENCE,
    MAX_FUTURE_MS,
    MAX_PAYLOAD_BYTES,
    Envelope,
    Event,
    EventIn,
    FanoutTask,
    Route,
)
from feedsvc.runtime import Runtime

log = logging.getLogger(__name__)

_EVENT_ID = re.compile(EVENT_ID_PATTERN)
_ID = re.compile(r"^[^\s/\x00-\x1f\x7f]{1,64}$")
_PATH = re.compile(r"at `\$\.?([^`]*)`")
_FIELD_NAME = re.compile(r"field `([^`]*)`")


class Accepted(msgspec.Struct, omit_defaults=True):
    event_id: str
    status: Literal["accepted", "duplicate"]
    route: Route | None = None


def valid_id(value: str) -> bool:
    """User and author ids: 1-64 characters, no whitespace, control characters or '/'."""
    return bool(_ID.fullmatch(value))


def decode_json(raw: bytes, into: Any = Any) -> Any:
    """Decode a request body; malformed or absurdly nested JSON is a 400."""
    try:
        return msgspec.json.decode(raw, type=into)
    except msgspec.ValidationError:
        if into is not Any:
            raise  # the JSON is fine, its shape is not: the caller says which field
        raise InvalidRequest("body is not valid JSON (a number out of range?)",
                             code="invalid_json") from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"body is not valid JSON: {exc}", code="invalid_json") from exc
    except RecursionError as exc:
        raise InvalidRequest("body is nested too deeply", code="invalid_json") from exc


def parse_body(raw: bytes) -> tuple[EventIn, str]:
    """Decode and type-check the body; returns the event and the hash of its JSON value."""
    value = decode_json(raw)
    if not isinstance(value, dict):
        raise InvalidRequest("body must be a JSON object", code="invalid_json")
    try:
        event = msgspec.convert(value, EventIn)
    except msgspec.ValidationError as exc:
        message = str(exc)
        field = _PATH.search(message)
        name = _FIELD_NAME.search(message)
        code = "invalid_field"
        if "unknown field" in message:
            code = "unknown_field"
        elif "missing required field" in message:
            code = "missing_field"
        where = field.group(1) if field else (name.group(1) if name else None)
        if field and name and code != "invalid_field":
            where = f"{field.group(1)}.{name.group(1)}"
        raise Unprocessable(message, code=code, field=where) from exc
    body_hash = hashlib.sha256(msgspec.json.encode(value, order="sorted")).hexdigest()
    return event, body_hash


def error_field(message: str) -> str | None:
    """The field a msgspec validation message names (``$.a.b`` -> ``a.b``; an unknown or
    missing field's own name appended), if any."""
    where, name = _PATH.search(message), _FIELD_NAME.search(message)
    path = where.group(1) if where else ""
    if name and ("unknown field" in message or "missing required field" in message):
        return f"{path}.{name.group(1)}" if path else name.group(1)
    return path or None


def parse_created_at(value: str | int | None, now_ms: int) -> int:
    if value is None:
        return now_ms
    if isinstance(value, int):
        return value
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as exc:
        raise Unprocessable("created_at must be RFC 3339 or epoch milliseconds",
                            code="invalid_field", field="created_at") from exc
    if moment.tzinfo is None or "T" not in value.upper():
        raise Unprocessable("created_at must be RFC 3339 with a time zone",
                            code="invalid_field", field="created_at")
    return int(moment.timestamp() * 1000)


def validate(event: EventIn, now_ms: int, retention_ms: int) -> int:
    """Check the limits; returns created_at in epoch ms."""
    if not _EVENT_ID.fullmatch(event.event_id):
        raise Unprocessable("event_id must be 1-128 characters of A-Z a-z 0-9 . _ : -",
                            code="invalid_field", field="event_id")
    if not valid_id(event.author_id):
        raise Unprocessable("author_id must be 1-64 characters without spaces or '/'",
                            code="invalid_field", field="author_id")
    if not 1 <= len(event.kind) <= 64:
        raise Unprocessable("kind must be 1-64 characters", code="invalid_field", field="kind")
    if event.object_id is not None and not 1 <= len(event.object_id) <= 128:
        raise Unprocessable("object_id must be 1-128 characters", code="invalid_field",
                            field="object_id")
    if event.audience is not None:
        users = event.audience.users
        if not users:
            raise Unprocessable("audience.users must not be empty", code="invalid_field",
                                field="audience.users")
        if len(users) > MAX_AUDIENCE:
            raise Unprocessable(f"audience.users holds at most {MAX_AUDIENCE} ids",
                                code="audience_too_large", field="audience.users")
        for i, user in enumerate(users):
            if not valid_id(user):
                raise Unprocessable("user ids are 1-64 characters without spaces or '/'",
                                    code="invalid_field", field=f"audience.users[{i}]")
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
    return created_at


async def accept(rt: Runtime, raw: bytes) -> tuple[int, Accepted]:
    """Accept one event. Returns (HTTP status, response body); raises ClientError."""
    now = rt.now_ms()
    incoming, body_hash = parse_body(raw)
    created_at = validate(incoming, now, rt.settings.retention_ms)
    route: Route
    if incoming.audience is not None:
        route = "direct"
    else:
        route = await refresh_mode(rt, incoming.author_id)
    event = Event(
        event_id=incoming.event_id, author_id=incoming.author_id, kind=incoming.kind,
        created_at=created_at, priority=incoming.priority,
        payload=msgspec.json.encode(incoming.payload).decode(), route=route,
        accepted_at=now, body_hash=body_hash, object_id=incoming.object_id,
        audience=list(dict.fromkeys(incoming.audience.users)) if incoming.audience else None,
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
    if row is None or not (row.done or row.queued_at):
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
