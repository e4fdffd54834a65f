"""Notification delivery end to end through HTTP on both backends, against the fake
providers (``tests/fakes``): notify on events, preferences, locales, send-once, retries
with Retry-After, dead tokens, dead letters and replay, the delivery log."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from feedsvc.delivery.providers.registry import Providers, open_providers
from feedsvc.model import ChannelTask, Envelope
from feedsvc.store.base import outbox_bucket
from feedsvc.sweeper import Sweeper
from feedsvc.workers import drain, process
from tests.apiclient import Api
from tests.conftest import MakeApi
from tests.fakes.ledger import Behaviour
from tests.fakes.suite import Fakes, running_fakes
from tests.test_durability import lose_queue

TEMPLATE = {"locales": {
    "en": {"title": "Hello {{ user_id }}", "body": "{{ data.school }} is closed"},
    "fr": {"title": "Bonjour {{ user_id }}", "body": "{{ data.school }} est fermée"},
}}


@pytest.fixture
async def fakes(tmp_path: Path) -> AsyncIterator[Fakes]:
    async with running_fakes(tmp_path) as running:
        yield running


class Setup:
    def __init__(self, api: Api, fakes: Fakes, providers: Providers) -> None:
        self.api, self.fakes, self.providers = api, fakes, providers

    async def call(self, method: str, path: str, body: Any = None,
                   headers: dict[str, str] | None = None) -> tuple[int, Any]:
        response = await self.api.client.request(method, path, json=body,
                                                 headers=headers or self.api.service)
        text = await response.text()
        return response.status, (await response.json() if text else None)

    async def deliver_all(self, within_s: float = 30.0) -> None:
        """Work every queue until nothing is queued or scheduled (retries included)."""
        deadline = time.monotonic() + within_s
        while True:
            await drain(self.api.rt, providers=self.providers)
            stats = await self.api.rt.queue.stats()
            if not sum(stats.queued.values()) and not stats.scheduled:
                return
            assert time.monotonic() < deadline, stats
            await asyncio.sleep(0.1)
            await self.api.rt.queue.move_due()

    async def deliveries(self, event_id: str, user: str) -> dict[tuple[str, str], Any]:
        status, body = await self.call("GET", f"/v1/events/{event_id}/deliveries/{user}")
        assert status == 200, body
        return {(d["channel"], d["target"]): d for d in body["deliveries"]}


@pytest.fixture
async def setup(make_api: MakeApi, fakes: Fakes) -> AsyncIterator[Setup]:
    api = await make_api(celebrity_threshold=1_000, delivery_max_attempts=3,
                         sweep_after=0.3, **fakes.settings())
    providers = open_providers(api.rt.settings)
    try:
        yield Setup(api, fakes, providers)
    finally:
        await providers.aclose()


async def register(s: Setup, user: str, *, fcm: str | None = None, apns: str | None = None,
                   webpush: bool = False, email: str | None = None,
                   phone: str | None = None) -> None:
    base = f"/v1/users/{user}"
    if fcm:
        assert (await s.call("PUT", f"{base}/devices/android",
                             {"platform": "fcm", "token": fcm}))[0] == 200
    if apns:
        assert (await s.call("PUT", f"{base}/devices/iphone",
                             {"platform": "apns", "token": apns}))[0] == 200
    if webpush:
        sub = s.fakes.webpush.subscribe()
        body = {"platform": "webpush", "subscription": {
            "endpoint": sub.endpoint, "keys": {"p256dh": sub.p256dh, "auth": sub.auth_b64}}}
        assert (await s.call("PUT", f"{base}/devices/browser", body))[0] == 200
    if email or phone:
        assert (await s.call("PUT", f"{base}/contacts", {"email": email, "phone": phone}))[0] \
            == 200


async def test_a_notification_reaches_every_channel_once(setup: Setup) -> None:
    s, api = setup, setup.api
    assert (await s.call("PUT", "/v1/templates/closure", TEMPLATE))[0] == 200
    author, ann, bob, cy = (api.user(n) for n in ("author", "ann", "bob", "cy"))
    await api.bulk([(ann, author), (bob, author), (cy, author)])
    await register(s, ann, fcm="tok-ann", webpush=True, email="ann@example.com",
                   phone="+14155550101")
    await register(s, bob, apns="tok-bob", email="bob@example.com", phone="+14155550102")
    await s.call("PUT", f"/v1/users/{bob}/preferences",
                 {"channels": {"sms": False}, "locale": "fr-CA"})
    # cy has nothing to send to
    event_id = api.user("closure-1")
    post = {"event_id": event_id, "author_id": author, "kind": "alert", "payload": {},
            "notify": {"channels": ["push", "sms", "email"], "template": "closure",
                       "data": {"school": "Lincoln"}}}
    assert (await s.call("POST", "/v1/events", post))[0] == 202
    await s.deliver_all()
    ledgers = s.fakes.ledgers()
    ann_id, bob_id = f"{event_id}:{ann}", f"{event_id}:{bob}"
    assert set(ledgers["fcm"].accepted) == {f"{ann_id}:push:android"}
    assert set(ledgers["webpush"].accepted) == {f"{ann_id}:push:browser"}
    assert set(ledgers["apns"].accepted) == {f"{bob_id}:push:iphone"}
    assert set(ledgers["sms"].accepted) == {f"{ann_id}:sms:sms"}  # bob turned sms off
    assert set(ledgers["email"].accepted) == {f"{ann_id}:email:email",
                                              f"{bob_id}:email:email"}
    fcm = ledgers["fcm"].accepted[f"{ann_id}:push:android"]
    assert (fcm["title"], fcm["body"]) == (f"Hello {ann}", "Lincoln is closed")
    assert fcm["data"]["notification_id"] == ann_id
    bob_mail = ledgers["email"].accepted[f"{bob_id}:email:email"]
    assert bob_mail["subject"] == f"Bonjour {bob}"  # fr-CA falls back to fr
    log = await s.deliveries(event_id, bob)
    assert log[("push", "iphone")]["status"] == "sent"
    assert log[("push", "iphone")]["attempts"] == 1
    assert (log[("sms", "sms")]["status"], log[("sms", "sms")]["reason"]) == (
        "suppressed", "preference")
    cy_log = await s.deliveries(event_id, cy)
    assert {k: (v["status"], v["reason"]) for k, v in cy_log.items()} == {
        ("push", "push"): ("suppressed", "no_device"),
        ("sms", "sms"): ("suppressed", "no_contact"),
        ("email", "email"): ("suppressed", "no_contact")}
    assert await s.deliveries(event_id, author) == {}  # never the author
    # The same event again notifies nobody.
    assert await s.call("POST", "/v1/events", post) == (
        200, {"event_id": event_id, "status": "duplicate"})
    await s.deliver_all()
    # A channel task redone (at-least-once: a worker died before its ack) sends nothing.
    event = await api.rt.store.get_event(event_id)
    assert event is not None
    await api.rt.queue.enqueue_many("push", "medium", [
        Envelope(ChannelTask(event, ann, "push"), api.rt.now_ms())])
    await s.deliver_all()
    assert sum(len(ledger.accepted) for ledger in ledgers.values()) == 6
    assert (ledgers["fcm"].requests, ledgers["webpush"].requests) == (1, 1)
    assert sum(ledger.repeat_count for ledger in ledgers.values()) == 0


async def test_retries_wait_for_retry_after_then_dead_letter_and_replay(
        setup: Setup) -> None:
    s, api = setup, setup.api
    author, fan = api.user("author"), api.user("fan")
    await api.follow(fan, author)
    await register(s, fan, fcm="tok-fan")
    s.fakes.fcm.behaviour = Behaviour(script=[503, 429], retry_after=1)
    started = time.monotonic()
    event_id = await api.post_ok(author, notify={"channels": ["push"],
                                                 "message": {"title": "t", "body": "b"}})
    await s.deliver_all()
    assert time.monotonic() - started >= 2  # two Retry-After: 1 waits
    key = f"{event_id}:{fan}:push:android"
    assert list(s.fakes.fcm.ledger.accepted) == [key]
    record = (await s.deliveries(event_id, fan))[("push", "android")]
    assert (record["status"], record["attempts"]) == ("sent", 3)

    # Failing every call: 3 attempts (FEEDSVC_DELIVERY_MAX_ATTEMPTS), then a dead letter.
    s.fakes.fcm.behaviour = Behaviour(error_rate=1.0, error_statuses=(503,))
    failing = await api.post_ok(author, notify={"channels": ["push"],
                                                "message": {"title": "t", "body": "b"}})
    await s.deliver_all()
    record = (await s.deliveries(failing, fan))[("push", "android")]
    assert (record["status"], record["reason"], record["attempts"]) == ("dead", "exhausted", 3)
    status, page = await s.call("GET", "/v1/dlq")
    assert status == 200
    (letter,) = [i for i in page["items"] if i["key"] == f"{failing}:{fan}:push:android"]
    assert (letter["reason"], letter["stream"]) == ("exhausted", "push:medium")
    s.fakes.fcm.behaviour = Behaviour()
    dead = await api.rt.queue.dead_letter_get(letter["entry_id"])
    assert dead is not None
    assert await s.call("POST", f"/v1/dlq/{letter['entry_id']}/replay") == (
        200, {"replayed": True})
    assert (await s.call("POST", f"/v1/dlq/{letter['entry_id']}/replay"))[0] == 404
    await s.deliver_all()
    assert f"{failing}:{fan}:push:android" in s.fakes.fcm.ledger.accepted
    # Replaying what was sent already sends nothing again (send-once holds).
    await api.rt.queue.bury("push", "medium", dead.envelope, "test", "a sent key again")
    for again in await api.rt.queue.dead_letters(50):
        assert await api.rt.queue.replay(again.dlq_id)
    await s.deliver_all()
    assert s.fakes.fcm.ledger.requests == 3 + 3 + 1  # no call for the replayed sent key
    assert len(s.fakes.fcm.ledger.accepted) == 2


async def test_dead_tokens_and_addresses_are_deactivated(setup: Setup) -> None:
    s, api = setup, setup.api
    author, fan = api.user("author"), api.user("fan")
    await api.follow(fan, author)
    await register(s, fan, fcm="tok-dead", email="gone@example.com", phone="+14155550199")
    s.fakes.fcm.behaviour = Behaviour(dead={"tok-dead"})
    s.fakes.smtp.behaviour = Behaviour(dead={"gone@example.com"})
    s.fakes.twilio.dead_numbers["+14155550199"] = 21610
    notify = {"channels": ["push", "sms", "email"], "message": {"title": "t", "body": "b"}}
    event_id = await api.post_ok(author, notify=notify)
    await s.deliver_all()
    log = await s.deliveries(event_id, fan)
    assert log[("push", "android")]["status"] == "failed"
    assert log[("push", "android")]["reason"] == "unregistered"
    assert log[("email", "email")]["status"] == "failed"
    assert log[("sms", "sms")]["status"] == "failed"
    devices = (await s.call("GET", f"/v1/users/{fan}/devices"))[1]["items"]
    assert [(d["active"], d["deactivated_reason"]) for d in devices] == [
        (False, "unregistered")]
    contacts = (await s.call("GET", f"/v1/users/{fan}/contacts"))[1]
    assert (contacts["email_active"], contacts["phone_active"]) == (False, False)
    again = await api.post_ok(author, notify=notify)
    await s.deliver_all()
    log = await s.deliveries(again, fan)
    assert {k: v["reason"] for k, v in log.items()} == {
        ("push", "android"): "inactive", ("email", "email"): "inactive",
        ("sms", "sms"): "inactive"}
    assert s.fakes.fcm.ledger.requests == 1  # nothing more was sent to the dead token


async def test_templates_and_notify_validation(setup: Setup) -> None:
    s, api = setup, setup.api
    author, fan = api.user("author"), api.user("fan")
    status, body = await s.call("PUT", "/v1/templates/broken",
                                {"locales": {"en": {"title": "{{ oops", "body": "x"}}})
    assert (status, body["error"]["field"]) == (422, "locales.en.title")
    status, body = await s.call("PUT", "/v1/templates/nofallback",
                                {"locales": {"fr": {"title": "t", "body": "b"}}})
    assert status == 422
    assert (await s.call("GET", "/v1/templates/broken"))[0] == 404
    nested = "{{" + "(" * 1300 + "1" + ")" * 1300 + "}}"
    status, body = await s.call("PUT", "/v1/templates/nested",
                                {"locales": {"en": {"title": nested, "body": "x"}}})
    assert (status, body["error"]["code"]) == (422, "invalid_template")
    strict = {"locales": {"en": {"title": "{{ data.missing }}", "body": "b"}}}
    assert await s.call("PUT", "/v1/templates/strict", strict) == (200, strict)
    assert await s.call("GET", "/v1/templates/strict") == (200, strict)
    for notify, field in [
        ({"channels": ["push"], "template": "nope"}, "notify.template"),
        ({"channels": ["push"]}, "notify"),
        ({"channels": ["push"], "template": "strict",
          "message": {"title": "t", "body": "b"}}, "notify"),
        ({"channels": [], "message": {"title": "t", "body": "b"}}, "notify.channels"),
        ({"channels": ["fax"], "message": {"title": "t", "body": "b"}}, "notify.channels[0]"),
        ({"channels": ["push"], "message": {"title": "t", "body": "b"},
          "data": {"x": "y" * 5000}}, "notify.data"),
    ]:
        status, body = await api.post(author, notify=notify)
        assert (status, body["error"]["field"]) == (422, field), notify
    await api.follow(fan, author)
    await register(s, fan, fcm="tok-fan")
    event_id = await api.post_ok(author, notify={"channels": ["push"], "template": "strict"})
    await s.deliver_all()
    record = (await s.deliveries(event_id, fan))[("push", "android")]
    assert (record["status"], record["reason"]) == ("dead", "render_error")
    assert not s.fakes.fcm.ledger.accepted


async def test_the_delivery_log_is_the_recipients_own(setup: Setup) -> None:
    s, api = setup, setup.api
    author, fan, other = api.user("author"), api.user("fan"), api.user("other")
    await api.follow(fan, author)
    event_id = await api.post_ok(author, notify={"channels": ["sms", "push"],
                                                 "message": {"title": "t", "body": "b"}})
    path = f"/v1/events/{event_id}/deliveries/{fan}"
    status, body = await s.call("GET", path, headers=api.token(fan))  # no worker yet
    assert status == 200 and body["notification_id"] == f"{event_id}:{fan}"
    assert sorted((d["channel"], d["target"], d["status"]) for d in body["deliveries"]) == [
        ("push", "push", "queued"), ("sms", "sms", "queued")]
    assert (await s.call("GET", f"/v1/events/{event_id}/deliveries/{other}"))[1][
        "deliveries"] == []  # not in the audience: nothing is owed to them
    await s.deliver_all()
    status, body = await s.call("GET", path, headers=api.token(fan))
    assert sorted((d["channel"], d["status"], d["reason"]) for d in body["deliveries"]) == [
        ("push", "suppressed", "no_device"), ("sms", "suppressed", "no_contact")]
    assert (await s.call("GET", path, headers=api.token(other)))[0] == 403


async def test_a_lost_notify_task_is_swept_and_sends_once(setup: Setup) -> None:
    """The notify fan-out's entry is lost (Redis lost it): the event stays unsettled in the
    outbox, the sweeper starts it over, and every delivery is still sent once."""
    s, api = setup, setup.api
    await api.rt.outbox.set_sweep_checkpoint(outbox_bucket(api.rt.now_ms()))
    author, fans = api.user("author"), [api.user(f"fan{i}") for i in range(3)]
    await api.bulk([(f, author) for f in fans])
    for fan in fans:
        await register(s, fan, fcm=f"tok-{fan}")
    await drain(api.rt)  # the backfills
    event_id = await api.post_ok(author, notify={"channels": ["push"],
                                                 "message": {"title": "t", "body": "b"}})
    fanout_entry = await api.rt.queue.claim("only-the-fan-out", 0.5)
    assert fanout_entry is not None
    await process(api.rt, fanout_entry)  # inbox rows written, the notify task queued ...
    await lose_queue(api.rt)  # ... and lost
    await asyncio.sleep(api.rt.settings.sweep_after + 0.1)
    assert (await Sweeper(api.rt, "test").sweep_once()).requeued == 1
    await s.deliver_all()
    assert set(s.fakes.fcm.ledger.accepted) == {f"{event_id}:{f}:push:android" for f in fans}
    await asyncio.sleep(api.rt.settings.sweep_after + 0.1)
    assert (await Sweeper(api.rt, "test").sweep_once()).requeued == 0  # settled now


async def test_ids_with_colons_do_not_share_a_log_or_a_send(setup: Setup) -> None:
    """``event:user`` could name two notifications when ids contain ':'; the log and the
    send-once claims are keyed apart, so each recipient sees only their own."""
    s, api = setup, setup.api
    author = api.user("author")
    first, second = api.user("a"), api.user("a") + ":x"
    await api.bulk([(first, author), (second, author)])
    await register(s, first, fcm="tok-1")
    await register(s, second, fcm="tok-2")
    event_id = await api.post_ok(author, notify={"channels": ["push"],
                                                 "message": {"title": "t", "body": "b"}})
    await s.deliver_all()
    assert {r["token"] for r in s.fakes.fcm.ledger.accepted.values()} == {"tok-1", "tok-2"}
    status, body = await s.call("GET", f"/v1/events/{event_id}/deliveries/{second}",
                                headers=api.token(second))
    assert status == 200 and body["notification_id"] == f"{event_id}:{second}"
    assert [d["status"] for d in body["deliveries"]] == ["sent"]


async def test_dead_letter_ids_out_of_range_are_4xx(setup: Setup) -> None:
    s = setup
    for bad in ("9" * 19, "9" * 19 + "-0", "x", "1:2:3"):
        assert (await s.call("POST", f"/v1/dlq/{bad}/replay"))[0] == 400, bad
        assert (await s.call("GET", f"/v1/dlq?cursor={bad}"))[0] == 400, bad
    assert (await s.call("POST", "/v1/dlq/12345-0/replay"))[0] == 404
