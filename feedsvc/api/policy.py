"""Routes of provider status webhooks, inbox read state and erasure.

- ``POST /v1/providers/twilio/status`` and ``POST /v1/providers/{provider}/status``: no
  bearer credential, the provider's signature instead (403 when it does not match; 404
  for a provider with no secret configured); never a 5xx for anything a caller sends
  (``feedsvc/delivery/status.py``).
- ``POST /v1/inbox/seen``, ``GET /v1/inbox/unread_count``: the caller's own inbox (a user
  token, or a service key naming ``user_id``) (``feedsvc/readstate.py``).
- ``DELETE /v1/users/{u}``, ``GET /v1/users/{u}/erasure``: service key
  (``feedsvc/erasure.py``).
"""

from __future__ import annotations

import contextlib
import re
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

from feedsvc import erasure, intake, readstate
from feedsvc.api.app import RUNTIME, Access, Handler, json_response
from feedsvc.api.params import inbox_owner, path_id, read_body, read_raw
from feedsvc.delivery import status
from feedsvc.errors import Forbidden, InvalidRequest, NotFound, Unprocessable
from feedsvc.model import MAX_BODY_BYTES
from feedsvc.store.policy import ErasureStatus

PROVIDER_PATTERN = r"^(?!.*\n)[a-z0-9_-]{1,32}$"
_PROVIDER = re.compile(PROVIDER_PATTERN)
_FORM = "application/x-www-form-urlencoded"
MAX_FORM_FIELDS = 200


# --- provider status webhooks ------------------------------------------------------------


def signed_url(request: web.Request) -> str:
    """The URL the provider called: ``FEEDSVC_PUBLIC_URL`` and the path and query as they
    arrived (a proxy in front changes scheme, host and port), else the request's own."""
    base = request.app[RUNTIME].settings.public_url
    if base is None:
        return str(request.url)
    return base.rstrip("/") + request.raw_path


_SIGNED = ("webhook-id", "webhook-timestamp", "webhook-signature")


async def twilio_status(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    if not request.headers.get("X-Twilio-Signature"):  # unsigned: refused, configured or not
        raise Forbidden("X-Twilio-Signature is required", code="bad_signature")
    token = rt.settings.sms_auth_token
    if token is None:
        raise NotFound("SMS (Twilio) is not configured here", code="unknown_provider")
    raw = await read_raw(request, MAX_BODY_BYTES, _FORM)
    try:
        params = parse_qsl(raw.decode("utf-8"), keep_blank_values=True,
                           max_num_fields=MAX_FORM_FIELDS)
    except ValueError as exc:  # invalid UTF-8, too many fields
        raise InvalidRequest(f"the form is malformed: {exc}", code="invalid_form") from exc
    status.check_twilio(request.headers.get("X-Twilio-Signature"), signed_url(request),
                        params, token)
    form = dict(params)
    sid, reported, code = form.get("MessageSid"), form.get("MessageStatus"), \
        form.get("ErrorCode")
    for name, value in (("MessageSid", sid), ("MessageStatus", reported)):
        if not value:
            raise Unprocessable(f"{name} is required", code="missing_field", field=name)
    assert sid is not None and reported is not None
    disable = status.twilio_disables(code)
    mapped = status.TWILIO_STATUSES.get(reported)
    if mapped is None and not disable:
        return json_response(status.StatusOut("ignored"))
    reason = f"twilio {code}" if code else None
    out = await status.apply_status(rt, "sms", sid[:256], mapped or "undelivered",
                                    reason, disable)
    return json_response(out)


async def provider_status(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    provider = path_id(request, "provider", _PROVIDER, "1-32 of a-z 0-9 _ -")
    if not all(request.headers.get(h) for h in _SIGNED):  # unsigned: refused either way
        raise Forbidden("webhook-id, webhook-timestamp and webhook-signature are required",
                        code="bad_signature")
    key = status.standard_key(rt.settings.webhook_secrets, provider)
    if key is None:
        raise NotFound(f"no status webhooks are configured for {provider!r}",
                       code="unknown_provider")
    raw = await read_body(request, MAX_BODY_BYTES)
    webhook_id = request.headers.get("webhook-id")
    status.check_webhook(key, webhook_id, request.headers.get("webhook-timestamp"),
                         request.headers.get("webhook-signature"), raw, rt.now_ms() / 1000)
    assert webhook_id is not None
    if len(webhook_id) > 256:
        raise Forbidden("webhook-id is longer than 256 characters", code="bad_signature")
    body, _ = intake.decode_body(raw, status.StatusEvent)
    reported = status.STANDARD_TYPES.get(body.type)
    if reported is None:
        return json_response(status.StatusOut("ignored"))
    if not await rt.policy.webhooks.claim(provider, webhook_id, status.SEEN_TTL_S):
        return json_response(status.StatusOut("duplicate"))
    try:
        disable = reported == "bounced" and body.data.bounce == "hard"
        out = await status.apply_status(rt, provider, body.data.message_id, reported,
                                        body.data.reason, disable)
    except BaseException:
        with contextlib.suppress(Exception):  # so the provider's retry is applied
            await rt.policy.webhooks.forget(provider, webhook_id)
        raise
    return json_response(out)


# --- inbox read state ----------------------------------------------------------------------


async def post_seen(request: web.Request) -> web.Response:
    user_id = inbox_owner(request)
    body, _ = intake.decode_body(await read_body(request, MAX_BODY_BYTES), readstate.SeenIn)
    return json_response(await readstate.mark_seen(request.app[RUNTIME], user_id, body.up_to))


async def get_unread_count(request: web.Request) -> web.Response:
    user_id = inbox_owner(request)
    return json_response(await readstate.unread_count(request.app[RUNTIME], user_id))


# --- erasure ---------------------------------------------------------------------------------


async def delete_user(request: web.Request) -> web.Response:
    user_id = path_id(request, "user_id")
    return json_response(await erasure.request_erasure(request.app[RUNTIME], user_id), 202)


async def get_erasure(request: web.Request) -> web.Response:
    user_id = path_id(request, "user_id")
    found = await request.app[RUNTIME].policy.erasures.status(user_id)
    if found is None:
        raise NotFound("no erasure of this user was requested")
    return json_response(found)


ROUTES: list[tuple[str, str, Handler, Access]] = [
    # Registered before the {provider} route, which would match it too.
    ("POST", "/v1/providers/twilio/status", twilio_status, "none"),
    ("POST", "/v1/providers/{provider}/status", provider_status, "none"),
    ("POST", "/v1/inbox/seen", post_seen, "any"),
    ("GET", "/v1/inbox/unread_count", get_unread_count, "any"),
    ("DELETE", "/v1/users/{user_id}", delete_user, "service"),
    ("GET", "/v1/users/{user_id}/erasure", get_erasure, "service"),
]

SCHEMA_TYPES = (status.StatusEvent, status.StatusOut, readstate.SeenIn, readstate.UnreadOut,
                ErasureStatus)


def openapi_paths(op: Any, param: Any, id_schema: dict[str, Any],
                  error: Any) -> dict[str, Any]:
    """These routes' part of the OpenAPI document (see ``feedsvc.api.recipients``)."""
    service: list[dict[str, list[str]]] = [{"serviceKey": []}]
    any_caller: list[dict[str, list[str]]] = [{"serviceKey": []}, {"userToken": []}]
    user = param("user_id", "path", id_schema)
    reader = param("user_id", "query", id_schema, description="required with a service key")

    def ok(schema: str, code: str = "200") -> dict[str, Any]:
        return {code: {"description": "OK", "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{schema}"}}}}}

    def signed(summary: str, parameters: list[Any], body: dict[str, Any]) -> dict[str, Any]:
        operation: dict[str, Any] = op(summary, None, ok("StatusOut"), parameters or None)
        for code in ("403", "408", "413", "415", "422", "503"):
            operation["responses"][code] = error(code)
        operation["requestBody"] = {"required": True, "content": body}
        return operation

    twilio_form = {"application/x-www-form-urlencoded": {"schema": {
        "type": "object", "properties": {name: {"type": "string"} for name in (
            "MessageSid", "MessageStatus", "ErrorCode")}}}}
    standard = {"application/json": {"schema": {"$ref": "#/components/schemas/StatusEvent"}}}
    headers = [param(name, "header", {"type": "string"}, required=True)
               for name in ("webhook-id", "webhook-timestamp", "webhook-signature")]
    return {
        "/v1/providers/twilio/status": {"post": signed(
            "Twilio's message status callback (X-Twilio-Signature)",
            [param("X-Twilio-Signature", "header", {"type": "string"}, required=True)],
            twilio_form)},
        "/v1/providers/{provider}/status": {"post": signed(
            "A provider's message status under Standard Webhooks signatures",
            [param("provider", "path", {"type": "string", "pattern": PROVIDER_PATTERN}),
             *headers], standard)},
        "/v1/inbox/seen": {"post": op(
            "Mark the inbox seen up to an event id or a cursor", any_caller,
            ok("UnreadOut"), [reader], "SeenIn")},
        "/v1/inbox/unread_count": {"get": op(
            "Unseen inbox items (at most 99; capped true means more)", any_caller,
            ok("UnreadOut"), [reader])},
        "/v1/users/{user_id}": {"delete": op(
            "Erase a user and everything of theirs (a background job)", service,
            ok("ErasureStatus", "202"), [user])},
        "/v1/users/{user_id}/erasure": {"get": op(
            "Progress of a user's erasure", service, ok("ErasureStatus"), [user])},
    }
