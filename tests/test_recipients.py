"""Delivery recipients through HTTP on both backends: devices, contacts, preferences, and
who may manage them."""

from __future__ import annotations

import base64
from typing import Any

from feedsvc.delivery.recipients import (
    MAX_DEVICES,
    ChannelSwitches,
    KindSwitches,
    Preferences,
    channel_allowed,
    deactivate_contact,
)
from tests.apiclient import Api
from tests.conftest import MakeApi


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


SUBSCRIPTION: dict[str, Any] = {"endpoint": "https://push.example.test/sub/1",
                "keys": {"p256dh": b64url(b"\x04" + bytes(range(64))),
                         "auth": b64url(bytes(16))}}


async def call(api: Api, method: str, path: str, body: Any = None,
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
    response = await api.client.request(method, path, json=body,
                                        headers=headers or api.service)
    text = await response.text()
    return response.status, (await response.json() if text else None)


def test_kind_overrides_decide_where_they_speak() -> None:
    prefs = Preferences(channels=ChannelSwitches(push=True, sms=False, email=True),
                        kinds={"alert": KindSwitches(sms=True),
                               "promo": KindSwitches(push=False)})
    assert channel_allowed(prefs, "alert", "sms")  # the override turns sms on
    assert channel_allowed(prefs, "alert", "push")  # left out: follows the switch
    assert not channel_allowed(prefs, "promo", "push")
    assert channel_allowed(prefs, "promo", "email")
    assert not channel_allowed(prefs, "post", "sms")


async def test_devices_register_list_deactivate_and_remove(make_api: MakeApi) -> None:
    api = await make_api()
    user = api.user("u")
    base = f"/v1/users/{user}/devices"
    status, body = await call(api, "PUT", f"{base}/phone", {"platform": "fcm", "token": "t1"})
    assert (status, body) == (200, {"device_id": "phone", "platform": "fcm", "active": True})
    status, body = await call(api, "PUT", f"{base}/browser",
                              {"platform": "webpush", "subscription": SUBSCRIPTION})
    assert status == 200 and body["platform"] == "webpush"
    status, body = await call(api, "GET", base)
    assert body == {"items": [
        {"device_id": "browser", "platform": "webpush", "active": True,
         "deactivated_reason": None},
        {"device_id": "phone", "platform": "fcm", "active": True, "deactivated_reason": None},
    ]}  # tokens are never returned
    (phone,) = [d for d in await api.rt.recipients.devices(user) if d.device_id == "phone"]
    await api.rt.recipients.deactivate_device(user, phone, "unregistered")
    listed = {d["device_id"]: d for d in (await call(api, "GET", base))[1]["items"]}
    assert listed["phone"]["active"] is False
    assert listed["phone"]["deactivated_reason"] == "unregistered"
    status, body = await call(api, "PUT", f"{base}/phone", {"platform": "fcm", "token": "t1"})
    assert body["active"] is True  # registering again reactivates
    assert (await call(api, "DELETE", f"{base}/phone"))[0] == 204
    assert (await call(api, "DELETE", f"{base}/phone"))[0] == 204  # idempotent
    assert [d["device_id"] for d in (await call(api, "GET", base))[1]["items"]] == ["browser"]


async def test_a_dead_token_is_not_revived_by_a_late_deactivation(make_api: MakeApi) -> None:
    api = await make_api()
    user = api.user("u")
    await call(api, "PUT", f"/v1/users/{user}/devices/p", {"platform": "apns", "token": "old"})
    (old,) = await api.rt.recipients.devices(user)
    await call(api, "PUT", f"/v1/users/{user}/devices/p", {"platform": "apns", "token": "new"})
    await api.rt.recipients.deactivate_device(user, old, "unregistered")  # the old token died
    (now,) = await api.rt.recipients.devices(user)
    assert now.active and now.token == "new"


async def test_device_validation_and_the_limit(make_api: MakeApi) -> None:
    api = await make_api()
    user = api.user("u")
    base = f"/v1/users/{user}/devices"
    bad: list[tuple[dict[str, Any], str]] = [
        ({"platform": "fcm"}, "token"),
        ({"platform": "fcm", "token": "t", "subscription": SUBSCRIPTION}, "token"),
        ({"platform": "webpush", "token": "t"}, "subscription"),
        ({"platform": "webpush", "subscription": {**SUBSCRIPTION, "endpoint": "ftp://x/y"}},
         "subscription.endpoint"),
        ({"platform": "webpush", "subscription": {**SUBSCRIPTION, "endpoint": "http://[x"}},
         "subscription.endpoint"),
        ({"platform": "webpush", "subscription": {**SUBSCRIPTION, "keys": {
            "p256dh": b64url(bytes(65)), "auth": b64url(bytes(16))}}},
         "subscription.keys.p256dh"),
        ({"platform": "webpush", "subscription": {**SUBSCRIPTION, "keys": {
            **SUBSCRIPTION["keys"], "auth": "!!"}}}, "subscription.keys.auth"),
        ({"platform": "sms", "token": "t"}, "platform"),
        ({"platform": "fcm", "token": "has space"}, "token"),
        ({"platform": "fcm", "token": "t", "extra": 1}, "extra"),
    ]
    for body, field in bad:
        status, answer = await call(api, "PUT", f"{base}/d", body)
        assert status == 422, (body, answer)
        assert answer["error"]["field"] == field, (body, answer)
    assert (await call(api, "GET", base))[1]["items"] == []  # nothing was stored
    for i in range(MAX_DEVICES):
        assert (await call(api, "PUT", f"{base}/d{i:02d}", {"platform": "fcm",
                                                             "token": f"t{i}"}))[0] == 200
    status, answer = await call(api, "PUT", f"{base}/one-more", {"platform": "fcm",
                                                                  "token": "x"})
    assert (status, answer["error"]["code"]) == (422, "too_many_devices")
    assert (await call(api, "PUT", f"{base}/d00", {"platform": "apns",
                                                    "token": "again"}))[0] == 200


async def test_a_user_token_manages_only_its_own_user(make_api: MakeApi) -> None:
    api = await make_api()
    me, other = api.user("me"), api.user("other")
    mine = api.token(me)
    for method, path, body in [
        ("PUT", "/v1/users/{}/devices/d", {"platform": "fcm", "token": "t"}),
        ("GET", "/v1/users/{}/devices", None),
        ("DELETE", "/v1/users/{}/devices/d", None),
        ("PUT", "/v1/users/{}/contacts", {"email": "a@example.com"}),
        ("GET", "/v1/users/{}/contacts", None),
        ("PUT", "/v1/users/{}/preferences", {"locale": "fr"}),
        ("GET", "/v1/users/{}/preferences", None),
    ]:
        own, _ = await call(api, method, path.format(me), body, mine)
        assert own in (200, 204), (method, path)
        status, answer = await call(api, method, path.format(other), body, mine)
        assert (status, answer["error"]["code"]) == (403, "forbidden"), (method, path)
    assert await api.rt.recipients.devices(other) == []
    assert await api.rt.recipients.contacts(other) is None


async def test_contacts(make_api: MakeApi) -> None:
    api = await make_api()
    user = api.user("u")
    path = f"/v1/users/{user}/contacts"
    assert await call(api, "GET", path) == (200, {"email": None, "phone": None,
                                                  "email_active": False,
                                                  "phone_active": False})
    status, body = await call(api, "PUT", path, {"email": "ann@example.com",
                                                 "phone": "+14155550123"})
    assert (status, body) == (200, {"email": "ann@example.com", "phone": "+14155550123",
                                    "email_active": True, "phone_active": True})
    for bad, field in [({"email": "not-an-address"}, "email"),
                       ({"phone": "4155550123"}, "phone"), ({"phone": "+0123"}, "phone"),
                       ({"email": 5}, "email"), ({"fax": "x"}, "fax")]:
        status, answer = await call(api, "PUT", path, bad)
        assert (status, answer["error"]["field"]) == (422, field), bad
    assert (await call(api, "GET", path))[1]["email"] == "ann@example.com"  # unchanged
    await deactivate_contact(api.rt.recipients, user, "email", "ann@example.com")  # bounced
    same = await call(api, "PUT", path, {"email": "ann@example.com", "phone": "+14155550123"})
    assert same[1]["email_active"] is False  # the same bounced address stays off
    assert same[1]["phone_active"] is True
    moved = await call(api, "PUT", path, {"email": "ann@example.org", "phone": None})
    assert moved[1] == {"email": "ann@example.org", "phone": None, "email_active": True,
                        "phone_active": False}


async def test_preferences(make_api: MakeApi) -> None:
    api = await make_api()
    user = api.user("u")
    path = f"/v1/users/{user}/preferences"
    defaults = {"channels": {"push": True, "sms": True, "email": True}, "kinds": {},
                "locale": "en", "quiet_hours": None}
    assert await call(api, "GET", path) == (200, defaults)
    status, body = await call(api, "PUT", path, {"channels": {"sms": False},
                                                 "kinds": {"alert": {"sms": True}},
                                                 "locale": "fr-CA"})
    assert (status, body) == (200, {"channels": {"push": True, "sms": False, "email": True},
                                    "kinds": {"alert": {"sms": True}}, "locale": "fr-CA",
                                    "quiet_hours": None})
    assert (await call(api, "GET", path))[1] == body
    for bad, field in [({"locale": "not a tag"}, "locale"),
                       ({"channels": {"fax": True}}, "channels.fax"),
                       ({"kinds": {"alert": {"push": "yes"}}}, "kinds[...].push")]:
        status, answer = await call(api, "PUT", path, bad)
        assert (status, answer["error"]["field"]) == (422, field), bad
    assert await call(api, "PUT", path, {}) == (200, defaults)  # a PUT replaces
