"""Provider status webhooks through HTTP on both backends: Twilio's signed status callback
and Standard Webhooks for another provider, after real sends to the fake providers."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from feedsvc.delivery.providers.email import message_id as email_message_id
from feedsvc.delivery.providers.registry import open_providers
from feedsvc.delivery.status import (
    check_webhook,
    next_status,
    sign_webhook,
    twilio_signature,
    webhook_key,
)
from feedsvc.errors import Forbidden
from tests.conftest import MakeApi
from tests.fakes import twilio as twilio_fake
from tests.fakes.suite import EMAIL_FROM, running_fakes
from tests.test_delivery import Setup, register
from tests.test_hostile import raw_request

PUBLIC = "https://feed.example.com"
SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
NOTIFY = {"channels": ["sms", "email"], "message": {"title": "t", "body": "b"}}


def test_signatures_match_the_published_examples() -> None:
    """Twilio's documented example request, and the Standard Webhooks spec's vector."""
    params = {"CallSid": "CA1234567890ABCDE", "Caller": "+12349013030", "Digits": "1234",
              "From": "+12349013030", "To": "+18005551212"}
    assert twilio_signature("https://mycompany.com/myapp.php?foo=1&bar=2",
                            params.items(), "12345") == "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
    key = webhook_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    body = b'{"test": 2432232314}'
    signature = sign_webhook(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    check_webhook(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", "1614265330",
                  f"v1,bm90IHRoaXMgb25l {signature}", body, 1614265330 + 299)
    for when, sig, sent in [(1614265330 + 301, signature, body),  # outside the tolerance
                            (1614265330, signature, body + b" "),  # another body
                            (1614265330, "v1," + signature[4:].lower(), body)]:
        with pytest.raises(Forbidden):
            check_webhook(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", "1614265330", sig, sent, when)
    # Header bytes that are not UTF-8 reach us as surrogates: refused, not a 500.
    for webhook_id, sig in [("msg_\udcff", signature), ("msg_p5jXN8AQM9LWM0D4loKWxJek",
                                                         "v1,\udcff")]:
        with pytest.raises(Forbidden):
            check_webhook(key, webhook_id, "1614265330", sig, body, 1614265330)


def test_statuses_move_forward_only() -> None:
    assert next_status("sent", "delivered") == "delivered"
    assert next_status("delivered", "opened") == "opened"
    assert next_status("opened", "delivered") is None
    assert next_status("opened", "bounced") is None
    assert next_status("bounced", "delivered") is None
    assert next_status("delivered", "bounced") == "bounced"
    assert next_status("delivered", "delivered") is None


@pytest.fixture
async def setup(make_api: MakeApi, tmp_path: Path) -> AsyncIterator[Setup]:
    async with running_fakes(tmp_path) as fakes:
        api = await make_api(celebrity_threshold=1_000, public_url=PUBLIC,
                             webhook_secrets=(("email", SECRET),), **fakes.settings())
        providers = open_providers(api.rt.settings)
        try:
            yield Setup(api, fakes, providers)
        finally:
            await providers.aclose()


async def sent_to_fan(s: Setup) -> tuple[str, str, str, str]:
    """A notification by sms and email to a fan; (event id, fan, sms sid, email id)."""
    api = s.api
    author, fan = api.user("author"), api.user("fan")
    await api.follow(fan, author)
    await register(s, fan, email="fan@example.com", phone="+14155550123")
    event_id = await api.post_ok(author, notify=NOTIFY)
    await s.deliver_all()
    nid = f"{event_id}:{fan}"
    sid = s.fakes.twilio.ledger.message_ids[f"{nid}:sms:sms"]
    return event_id, fan, sid, email_message_id(f"{nid}:email:email", EMAIL_FROM)


async def twilio(s: Setup, form: dict[str, str], *, url: str = PUBLIC,
                 token: str = twilio_fake.AUTH_TOKEN, signature: str | None = None,
                 body: bytes | None = None) -> tuple[int, Any]:
    path = "/v1/providers/twilio/status"
    headers = {"Content-Type": "application/x-www-form-urlencoded",
               "X-Twilio-Signature": signature or twilio_signature(
                   url + path, form.items(), token)}
    response = await s.api.client.post(path, data=body or urlencode(form).encode(),
                                       headers=headers)
    return response.status, await response.json()


async def standard(s: Setup, body: Any, *, webhook_id: str, provider: str = "email",
                   timestamp: int | None = None, key: bytes | None = None,
                   raw: bytes | None = None) -> tuple[int, Any]:
    data = raw if raw is not None else json.dumps(body).encode()
    stamp = int(time.time()) if timestamp is None else timestamp
    headers = {"Content-Type": "application/json", "webhook-id": webhook_id,
               "webhook-timestamp": str(stamp),
               "webhook-signature": sign_webhook(key or webhook_key(SECRET), webhook_id,
                                                 stamp, data)}
    response = await s.api.client.post(f"/v1/providers/{provider}/status", data=data,
                                       headers=headers)
    return response.status, await response.json()


async def test_twilio_callbacks_update_the_log_and_disable_opted_out_numbers(
        setup: Setup) -> None:
    s = setup
    event_id, fan, sid, _ = await sent_to_fan(s)
    form = {"MessageSid": sid, "MessageStatus": "delivered", "AccountSid": "AC1",
            "SmsStatus": "delivered"}
    # Signed for the URL the test server saw, not the configured public one: refused.
    local = str(s.api.client.make_url("")).rstrip("/")
    assert (await twilio(s, form, url=local))[0] == 403
    assert (await twilio(s, form, token="another-token"))[0] == 403
    assert (await twilio(s, form, signature="bm9wZQ=="))[0] == 403
    assert (await s.deliveries(event_id, fan))[("sms", "sms")]["status"] == "sent"

    assert await twilio(s, {**form, "MessageStatus": "sending"}) == (200, {
        "result": "ignored", "status": None})
    assert await twilio(s, form) == (200, {"result": "applied", "status": "delivered"})
    assert (await s.deliveries(event_id, fan))[("sms", "sms")]["status"] == "delivered"
    assert (await twilio(s, form))[1]["result"] == "unchanged"

    opted_out = {"MessageSid": sid, "MessageStatus": "undelivered", "ErrorCode": "21610"}
    assert await twilio(s, opted_out) == (200, {"result": "applied", "status": "undelivered"})
    record = (await s.deliveries(event_id, fan))[("sms", "sms")]
    assert (record["status"], record["reason"]) == ("undelivered", "twilio 21610")
    contacts = (await s.call("GET", f"/v1/users/{fan}/contacts"))[1]
    assert (contacts["phone_active"], contacts["email_active"]) == (False, True)
    unknown = {"MessageSid": "SM" + "0" * 32, "MessageStatus": "delivered"}
    assert (await twilio(s, unknown))[1] == {"result": "unknown_message", "status": None}


async def test_twilio_bad_input_is_4xx_and_changes_nothing(setup: Setup) -> None:
    s = setup
    event_id, fan, sid, _ = await sent_to_fan(s)
    path = "/v1/providers/twilio/status"
    bad_utf8 = b"MessageSid=\xff\xfe&MessageStatus=delivered"
    assert (await twilio(s, {}, body=bad_utf8))[0] == 400
    many = "&".join(f"f{i}=x" for i in range(500)).encode()
    assert (await twilio(s, {}, body=many))[0] == 400
    response = await s.api.client.post(path, json={"MessageSid": sid},
                                       headers={"X-Twilio-Signature": "x"})
    assert response.status == 415
    assert (await twilio(s, {"MessageStatus": "delivered"}))[0] == 422  # signed, no sid
    for code in ("²", "9" * 5000, "-21610", "21610.0"):
        form = {"MessageSid": sid, "MessageStatus": "sending", "ErrorCode": code}
        assert (await twilio(s, form))[1]["result"] == "ignored", code
    response = await s.api.client.post(path, data=b"MessageSid=x",
                                       headers={"Content-Type": _FORM})
    assert response.status == 403  # no signature at all
    for header in (b"X-Twilio-Signature: \xff\xfe", b"X-Twilio-Signature: \xc3\xa9"):
        status, body = await raw_request(s.api, (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {_FORM}\r\n"
            "Content-Length: 12\r\nConnection: close\r\n").encode() + header +
            b"\r\n\r\nMessageSid=x")
        assert (status, body["error"]["code"]) == (403, "bad_signature"), header
    assert (await s.deliveries(event_id, fan))[("sms", "sms")]["status"] == "sent"
    contacts = (await s.call("GET", f"/v1/users/{fan}/contacts"))[1]
    assert contacts["phone_active"] is True


_FORM = "application/x-www-form-urlencoded"


async def test_standard_webhooks_apply_once_and_hard_bounces_disable(setup: Setup) -> None:
    s = setup
    event_id, fan, _, mail_id = await sent_to_fan(s)
    opened = {"type": "message.opened", "timestamp": "2026-12-02T05:00:00Z",
              "data": {"message_id": mail_id}}
    assert await standard(s, opened, webhook_id="msg_1") == (
        200, {"result": "applied", "status": "opened"})
    assert (await s.deliveries(event_id, fan))[("email", "email")]["status"] == "opened"
    # The same webhook-id again (a replay, even carrying another body) is not applied.
    bounced = {"type": "message.bounced", "data": {"message_id": mail_id, "bounce": "hard"}}
    assert await standard(s, bounced, webhook_id="msg_1") == (
        200, {"result": "duplicate", "status": None})
    contacts = (await s.call("GET", f"/v1/users/{fan}/contacts"))[1]
    assert contacts["email_active"] is True
    # Refused: stale, wrong key, unknown provider, other types ignored.
    assert (await standard(s, bounced, webhook_id="msg_2",
                           timestamp=int(time.time()) - 400))[0] == 403
    assert (await standard(s, bounced, webhook_id="msg_3", key=b"x" * 32))[0] == 403
    assert (await standard(s, bounced, webhook_id="msg_4", provider="fcm"))[0] == 404
    assert (await standard(s, bounced, webhook_id="msg_5", provider="Bad!"))[0] == 400
    assert (await standard(s, {"type": "message.clicked", "data": {"message_id": mail_id}},
                           webhook_id="msg_6"))[1]["result"] == "ignored"
    for raw, status in [(b"{not json", 400), (b"[]", 400), (b'{"type": 1}', 422),
                        (b'{"type": "message.opened", "data": {}}', 422)]:
        assert (await standard(s, None, webhook_id=f"raw-{status}-{len(raw)}", raw=raw)
                )[0] == status, raw
    assert (await s.deliveries(event_id, fan))[("email", "email")]["status"] == "opened"
    # A hard bounce under a new id: the log keeps "opened" (it was read), the address is
    # disabled all the same.
    assert (await standard(s, bounced, webhook_id="msg_7"))[1]["result"] == "unchanged"
    contacts = (await s.call("GET", f"/v1/users/{fan}/contacts"))[1]
    assert (contacts["email_active"], contacts["phone_active"]) == (False, True)
    # The seen webhook-id is remembered in the store (durable), not in this process.
    assert not await s.api.rt.policy.webhooks.claim("email", "msg_1", 60)
    assert await s.api.rt.policy.webhooks.claim("email", "msg_fresh", 60)
    again = await s.api.post_ok(s.api.user("author"), notify=NOTIFY)
    await s.deliver_all()
    assert (await s.deliveries(again, fan))[("email", "email")]["reason"] == "inactive"
