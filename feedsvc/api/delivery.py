"""Routes of notification delivery: templates, the delivery log, and the dead letters.

``PUT/GET /v1/templates/{name}`` (service key); ``GET /v1/events/{e}/deliveries/{u}``
(service key or user u's token); ``GET /v1/dlq`` and ``POST /v1/dlq/{entry_id}/replay``
(service key), for fan-out and delivery entries alike. Templates are checked by
``feedsvc/delivery/templates.py``; a replayed delivery keeps send-once.
``POST /v1/notifications/{notification_id}/opened`` (the recipient's own token): the user
opened that notification, so its escalation sends nothing (``feedsvc/delivery/
escalation.py``).
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
from aiohttp import web

from feedsvc.api.app import RUNTIME, Access, Handler, json_response, principal_of
from feedsvc.api.params import path_id, query_limit
from feedsvc.api.recipients import own_user, read_json
from feedsvc.delivery.escalation import mark_opened
from feedsvc.delivery.notify import notification_id
from feedsvc.delivery.state import DeliveryRecord
from feedsvc.delivery.templates import Template, check_template
from feedsvc.errors import Forbidden, InvalidRequest, NotFound
from feedsvc.model import (
    EVENT_ID_PATTERN,
    TEMPLATE_NAME_PATTERN,
    ChannelTask,
    FanoutTask,
    NotifyTask,
)
from feedsvc.queue.base import DeadLetter
from feedsvc.runtime import Runtime

# A dead letter's id: a stream entry id ("<ms>-<seq>", after "<shard>:" with shards) or the
# embedded queue's row id; 18 digits at most, so every part fits a 64-bit integer.
DLQ_ID_PATTERN = r"^(?!.*\n)(?:[0-9]{1,4}:)?[0-9]{1,18}(?:-[0-9]{1,18})?$"
_DLQ_ID = re.compile(DLQ_ID_PATTERN)
_TEMPLATE_NAME = re.compile(TEMPLATE_NAME_PATTERN)
_EVENT_ID = re.compile(EVENT_ID_PATTERN)


class Deliveries(msgspec.Struct):
    notification_id: str
    deliveries: list[DeliveryRecord]


class DeadLetterOut(msgspec.Struct):
    entry_id: str
    stream: str  # queue:priority
    reason: str
    detail: str
    key: str  # the delivery key, or the event id of a fan-out
    failed_at: int  # epoch ms


class DeadLetterPage(msgspec.Struct):
    items: list[DeadLetterOut]
    next_cursor: str | None


class Replayed(msgspec.Struct):
    replayed: bool


def _name(request: web.Request) -> str:
    return path_id(request, "name", _TEMPLATE_NAME, "1-64 of A-Z a-z 0-9 . _ -")


async def put_template(request: web.Request) -> web.Response:
    name = _name(request)
    template = await read_json(request, Template)
    check_template(template)
    await request.app[RUNTIME].delivery.templates.put_template(name, template)
    return json_response(template)


async def get_template(request: web.Request) -> web.Response:
    template = await request.app[RUNTIME].delivery.templates.template(_name(request))
    if template is None:
        raise NotFound("no such template")
    return json_response(template)


async def get_deliveries(request: web.Request) -> web.Response:
    event_id = path_id(request, "event_id", _EVENT_ID, "1-128 of A-Z a-z 0-9 . _ : -")
    user_id = own_user(request)
    rt = request.app[RUNTIME]
    records = await rt.delivery.log.records(event_id, user_id)
    return json_response(Deliveries(notification_id(event_id, user_id),
                                    records + await _queued(rt, event_id, user_id, records)))


async def _queued(rt: Runtime, event_id: str, user_id: str, records: list[DeliveryRecord]
                  ) -> list[DeliveryRecord]:
    """``queued`` for each channel the event notifies on that has no record yet for a user
    in its audience: the work is accepted but no worker has resolved its targets. Shown
    at read time rather than written per recipient at notify time (that write would double
    the log's writes); "in the audience" for a follower audience is judged by the follow
    edge as it is now."""
    logged = {r.channel for r in records}
    event = await rt.store.get_event(event_id)
    if event is None or event.notify is None or user_id == event.author_id:
        return []
    missing = [c for c in dict.fromkeys(event.notify.channels) if c not in logged]
    if not missing:
        return []
    if event.audience is not None:
        audience = user_id in event.audience
    else:
        audience = bool(await rt.store.following_subset(user_id, [event.author_id]))
    return [DeliveryRecord(c, c, "queued", updated_at=event.accepted_at)
            for c in missing] if audience else []


async def post_opened(request: web.Request) -> web.Response:
    principal = principal_of(request)
    if principal.service or principal.user_id is None:
        raise Forbidden("only the recipient's own token reports a notification opened")
    notification = request.match_info["notification_id"]
    suffix = f":{principal.user_id}"
    if not notification.endswith(suffix):
        raise Forbidden("a user token can only report its own user's notifications")
    event_id = notification[:-len(suffix)]
    if not _EVENT_ID.search(event_id):
        raise InvalidRequest("notification_id must be event_id:user_id",
                             code="invalid_path", field="notification_id")
    rt = request.app[RUNTIME]
    event = await rt.store.get_event(event_id)
    if event is None or event.notify is None:
        raise NotFound("no such notification")
    await mark_opened(rt, event_id, principal.user_id, rt.ttl_left_s(event.created_at))
    return web.Response(status=204)


def key_of(letter: DeadLetter) -> str:
    task = letter.envelope.task
    if isinstance(task, ChannelTask):
        target = task.target or task.channel
        return f"{notification_id(task.event.event_id, task.user_id)}:{task.channel}:{target}"
    if isinstance(task, FanoutTask | NotifyTask):
        return task.event.event_id
    return task.__struct_config__.tag if isinstance(task.__struct_config__.tag, str) else ""


async def get_dlq(request: web.Request) -> web.Response:
    limit = query_limit(request, 50, 500)
    cursor = request.query.get("cursor")
    if cursor is not None and not _DLQ_ID.search(cursor):
        raise InvalidRequest("cursor is not one this API returned", code="invalid_cursor",
                             field="cursor")
    letters = await request.app[RUNTIME].queue.dead_letters(limit + 1, cursor)
    more = len(letters) > limit
    letters = letters[:limit]
    items = [DeadLetterOut(letter.dlq_id, f"{letter.queue}:{letter.priority}", letter.reason,
                           letter.detail, key_of(letter), letter.failed_at)
             for letter in letters]
    return json_response(DeadLetterPage(items, letters[-1].dlq_id if more else None))


async def replay_dead_letter(request: web.Request) -> web.Response:
    entry_id = path_id(request, "entry_id", _DLQ_ID, "a dead letter's entry_id")
    if not await request.app[RUNTIME].queue.replay(entry_id):
        raise NotFound("no such dead letter")
    return json_response(Replayed(True))


ROUTES: list[tuple[str, str, Handler, Access]] = [
    ("PUT", "/v1/templates/{name}", put_template, "service"),
    ("GET", "/v1/templates/{name}", get_template, "service"),
    ("GET", "/v1/events/{event_id}/deliveries/{user_id}", get_deliveries, "any"),
    ("GET", "/v1/dlq", get_dlq, "service"),
    ("POST", "/v1/dlq/{entry_id}/replay", replay_dead_letter, "service"),
    ("POST", "/v1/notifications/{notification_id}/opened", post_opened, "any"),
]

SCHEMA_TYPES = (Template, Deliveries, DeadLetterPage, Replayed)


def openapi_paths(op: Any, param: Any, id_schema: dict[str, Any],
                  limit: dict[str, Any]) -> dict[str, Any]:
    """These routes' part of the OpenAPI document (see ``feedsvc.api.recipients``)."""
    service: list[dict[str, list[str]]] = [{"serviceKey": []}]
    any_caller: list[dict[str, list[str]]] = [{"serviceKey": []}, {"userToken": []}]
    name = param("name", "path", {"type": "string", "pattern": TEMPLATE_NAME_PATTERN})
    event = param("event_id", "path", {"type": "string", "pattern": EVENT_ID_PATTERN})
    entry = param("entry_id", "path", {"type": "string", "pattern": DLQ_ID_PATTERN})
    cursor = param("cursor", "query", {"type": "string", "pattern": DLQ_ID_PATTERN},
                   description="next_cursor of the page before")

    def ok(schema: str) -> dict[str, Any]:
        return {"200": {"description": "OK", "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{schema}"}}}}}

    return {
        "/v1/templates/{name}": {
            "put": op("Store a notification template (checked: 422 names what does not "
                      "compile)", service, ok("Template"), [name], "Template"),
            "get": op("A stored template", service, ok("Template"), [name]),
        },
        "/v1/events/{event_id}/deliveries/{user_id}": {
            "get": op("The deliveries of one recipient's notification of an event",
                      any_caller, ok("Deliveries"),
                      [event, param("user_id", "path", id_schema)]),
        },
        "/v1/dlq": {
            "get": op("Dead letters, newest first (fan-out and deliveries)", service,
                      ok("DeadLetterPage"), [limit, cursor]),
        },
        "/v1/dlq/{entry_id}/replay": {
            "post": op("Put a dead letter's task back on its queue (send-once holds)",
                       service, ok("Replayed"), [entry]),
        },
        "/v1/notifications/{notification_id}/opened": {
            "post": op("The recipient opened the notification (no escalation follows)",
                       [{"userToken": []}], {"204": {"description": "recorded"}},
                       [param("notification_id", "path", {
                           "type": "string", "minLength": 3, "maxLength": 193,
                           "description": "event_id:user_id"})]),
        },
    }
