"""Routes of delivery recipients: a user's devices, contacts and preferences.

``PUT/DELETE /v1/users/{u}/devices/{d}``, ``GET /v1/users/{u}/devices``, ``PUT/GET
/v1/users/{u}/contacts``, ``PUT/GET /v1/users/{u}/preferences``: with the service key, or
that user's own token (403 for another user's). Validation is in
``feedsvc/delivery/recipients.py``; storage behind ``Runtime.recipients``.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec
from aiohttp import web

from feedsvc import intake
from feedsvc.api.app import RUNTIME, Access, Handler, json_response, principal_of
from feedsvc.api.params import path_id, read_body
from feedsvc.delivery.recipients import (
    MAX_DEVICES,
    Contacts,
    ContactsIn,
    DeviceIn,
    DeviceList,
    DeviceListItem,
    DeviceOut,
    Preferences,
    PreferencesIn,
    contacts_from,
    device_from,
    preferences_from,
)
from feedsvc.errors import Forbidden, Unprocessable
from feedsvc.model import MAX_BODY_BYTES

S = TypeVar("S", bound=msgspec.Struct)


def own_user(request: web.Request, name: str = "user_id") -> str:
    """The path's user id, if the caller may manage that user's data (service key, or the
    user's own token)."""
    user_id = path_id(request, name)
    principal = principal_of(request)
    if not principal.service and principal.user_id != user_id:
        raise Forbidden("a user token can only manage its own user's data")
    return user_id


async def read_json(request: web.Request, into: type[S]) -> S:
    """The request body as ``into``: 415/413/408 as for every JSON route, 400 for malformed
    JSON, a 422 naming the field for a shape error."""
    body, _ = intake.decode_body(await read_body(request, MAX_BODY_BYTES), into)
    return body


# --- devices ---------------------------------------------------------------------------------


async def put_device(request: web.Request) -> web.Response:
    user_id = own_user(request)
    await request.app[RUNTIME].erased.refuse(request.app[RUNTIME], user_id)
    device_id = path_id(request, "device_id")
    device = device_from(device_id, await read_json(request, DeviceIn))
    if not await request.app[RUNTIME].recipients.put_device(user_id, device):
        raise Unprocessable(f"a user has at most {MAX_DEVICES} devices",
                            code="too_many_devices", field="device_id")
    return json_response(DeviceOut(device.device_id, device.platform, device.active))


async def delete_device(request: web.Request) -> web.Response:
    user_id = own_user(request)
    await request.app[RUNTIME].recipients.delete_device(user_id, path_id(request, "device_id"))
    return web.Response(status=204)


async def get_devices(request: web.Request) -> web.Response:
    user_id = own_user(request)
    devices = await request.app[RUNTIME].recipients.devices(user_id)
    return json_response(DeviceList([
        DeviceListItem(d.device_id, d.platform, d.active, d.deactivated_reason)
        for d in devices]))


# --- contacts and preferences -------------------------------------------------------------


async def put_contacts(request: web.Request) -> web.Response:
    user_id = own_user(request)
    await request.app[RUNTIME].erased.refuse(request.app[RUNTIME], user_id)
    body = await read_json(request, ContactsIn)
    recipients = request.app[RUNTIME].recipients
    contacts = contacts_from(body, await recipients.contacts(user_id))
    await recipients.put_contacts(user_id, contacts)
    return json_response(contacts)


async def get_contacts(request: web.Request) -> web.Response:
    user_id = own_user(request)
    return json_response(await request.app[RUNTIME].recipients.contacts(user_id)
                         or Contacts())


async def put_preferences(request: web.Request) -> web.Response:
    user_id = own_user(request)
    await request.app[RUNTIME].erased.refuse(request.app[RUNTIME], user_id)
    prefs = preferences_from(await read_json(request, PreferencesIn))
    await request.app[RUNTIME].recipients.put_preferences(user_id, prefs)
    return json_response(prefs)


async def get_preferences(request: web.Request) -> web.Response:
    user_id = own_user(request)
    return json_response(await request.app[RUNTIME].recipients.preferences(user_id)
                         or Preferences())


_DEVICE = "/v1/users/{user_id}/devices/{device_id}"
ROUTES: list[tuple[str, str, Handler, Access]] = [
    ("PUT", _DEVICE, put_device, "any"),
    ("DELETE", _DEVICE, delete_device, "any"),
    ("GET", "/v1/users/{user_id}/devices", get_devices, "any"),
    ("PUT", "/v1/users/{user_id}/contacts", put_contacts, "any"),
    ("GET", "/v1/users/{user_id}/contacts", get_contacts, "any"),
    ("PUT", "/v1/users/{user_id}/preferences", put_preferences, "any"),
    ("GET", "/v1/users/{user_id}/preferences", get_preferences, "any"),
]


def openapi_paths(op: Any, param: Any, id_schema: dict[str, Any]) -> dict[str, Any]:
    """These routes' part of the OpenAPI document (``op``/``param`` build operations and
    parameters the way ``feedsvc.api.openapi`` does, with every error status)."""
    user, device = param("user_id", "path", id_schema), param("device_id", "path", id_schema)
    any_caller: list[dict[str, list[str]]] = [{"serviceKey": []}, {"userToken": []}]

    def ok(schema: str) -> dict[str, Any]:
        return {"200": {"description": "OK", "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{schema}"}}}}}

    return {
        _DEVICE: {
            "put": op("Register or re-register a device", any_caller, ok("DeviceOut"),
                      [user, device], "DeviceIn"),
            "delete": op("Remove a device (idempotent)", any_caller,
                         {"204": {"description": "removed"}}, [user, device]),
        },
        "/v1/users/{user_id}/devices": {
            "get": op("A user's devices (tokens are never returned)", any_caller,
                      ok("DeviceList"), [user]),
        },
        "/v1/users/{user_id}/contacts": {
            "put": op("Set email and phone", any_caller, ok("Contacts"), [user],
                      "ContactsIn"),
            "get": op("Email and phone, and whether each still receives", any_caller,
                      ok("Contacts"), [user]),
        },
        "/v1/users/{user_id}/preferences": {
            "put": op("Set notification preferences (defaults fill what is left out)",
                      any_caller, ok("Preferences"), [user], "PreferencesIn"),
            "get": op("Notification preferences", any_caller, ok("Preferences"), [user]),
        },
    }


SCHEMA_TYPES = (DeviceIn, DeviceOut, DeviceList, ContactsIn, Contacts, PreferencesIn,
                Preferences)
