"""Erasure through HTTP on both backends: ``DELETE /v1/users/{u}`` removes the user's
recipients data, follow edges (counts fixed), inbox, events, delivery log and send-once
keys; the background job's progress shows; nothing of theirs is returned or sent after."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from feedsvc import erasure
from feedsvc.delivery.notify import claim_key
from feedsvc.delivery.providers.registry import open_providers
from feedsvc.model import ChannelTask, Envelope, EraseTask
from tests.conftest import MakeApi
from tests.fakes.suite import running_fakes
from tests.test_delivery import Setup, register
from tests.test_durability import lose_queue

PUSH = {"channels": ["push"], "message": {"title": "t", "body": "b"}}


@pytest.fixture
async def setup(make_api: MakeApi, tmp_path: Path) -> AsyncIterator[Setup]:
    async with running_fakes(tmp_path) as fakes:
        api = await make_api(celebrity_threshold=3, **fakes.settings())
        providers = open_providers(api.rt.settings)
        try:
            yield Setup(api, fakes, providers)
        finally:
            await providers.aclose()


async def test_erasure_removes_everything_and_sends_nothing_after(setup: Setup) -> None:
    s, api, rt = setup, setup.api, setup.api.rt
    victim, author, star, friend = (api.user(n) for n in ("victim", "author", "star", "friend"))
    fans = [api.user(f"fan{i}") for i in range(2)]
    await api.bulk([(victim, author), (victim, star), (fans[0], star), (fans[1], star)]
                   + [(f, victim) for f in fans])
    await register(s, victim, fcm="tok-victim", email="v@example.com", phone="+14155550100")
    await register(s, friend, fcm="tok-friend")
    assert (await s.call("PUT", f"/v1/users/{victim}/preferences", {"locale": "fr"}))[0] == 200
    await api.drain()
    notified = await api.post_ok(author, notify=PUSH)
    own = [await api.post_ok(victim) for _ in range(2)]
    direct = await api.post_ok(victim, audience={"users": [friend]})
    await s.deliver_all()
    key = f"{notified}:{victim}:push:android"
    assert key in s.fakes.fcm.ledger.accepted
    assert (await s.call("POST", "/v1/inbox/seen", {"up_to": notified},
                         headers=api.token(victim)))[0] == 200
    assert set(own) <= set(await api.inbox_ids(fans[0]))
    assert direct in await api.inbox_ids(friend)
    assert (await s.call("GET", f"/v1/users/{author}"))[1]["followers"] == 1
    # A notification already queued for the victim when the erasure comes.
    event = await rt.store.get_event(notified)
    assert event is not None
    await rt.queue.enqueue("medium", Envelope(ChannelTask(event, victim, "email"),
                                              rt.now_ms()), queue="email")

    late = await api.post_ok(victim)  # its fan-out is still queued when the erasure comes
    assert (await s.call("DELETE", f"/v1/users/{victim}", headers=api.token(victim)))[0] == 403
    status, body = await s.call("DELETE", f"/v1/users/{victim}")
    assert status == 202 and (body["state"], body["step"]) == ("queued", "following")
    # At once: nothing of theirs is returned, nothing new of theirs is accepted.
    assert not set(own) & set(await api.inbox_ids(fans[0]))
    assert direct not in await api.inbox_ids(friend)
    assert (await s.call("GET", f"/v1/users/{victim}/events"))[1]["items"] == []
    assert (await s.call("GET", f"/v1/users/{victim}/devices"))[1]["items"] == []
    assert (await s.call("GET", f"/v1/users/{victim}/contacts"))[1]["email"] is None
    assert (await s.call("GET", f"/v1/users/{victim}/preferences"))[1]["locale"] == "en"
    status, body = await api.post(victim)
    assert (status, body["error"]["code"]) == (422, "user_erased")
    for method, path, payload in [
        ("PUT", f"/v1/users/{fans[0]}/following/{victim}", None),
        ("PUT", f"/v1/users/{victim}/devices/d2", {"platform": "fcm", "token": "t2"}),
        ("PUT", f"/v1/users/{victim}/contacts", {"email": "again@example.com"}),
        ("POST", "/v1/follows/bulk", {"follows": [{"user_id": victim, "author_id": star}]}),
    ]:
        status, body = await s.call(method, path, payload)
        assert (status, body["error"]["code"]) == (422, "user_erased"), path
    # A direct event naming them reaches the others only.
    both = await api.post_ok(author, audience={"users": [victim, friend]}, notify=PUSH)

    await s.deliver_all()  # the erasure job, and everything queued
    status, body = await s.call("GET", f"/v1/users/{victim}/erasure")
    assert status == 200 and (body["state"], body["step"]) == ("done", "done")
    assert body["removed"]["following"] == 2 and body["removed"]["followers"] == 2
    assert body["removed"]["events"] == 3 and body["removed"]["devices"] == 1
    assert body["removed"]["direct"] == 1
    assert body["removed"]["deliveries"] >= 1

    accepted = s.fakes.fcm.ledger.accepted
    assert f"{both}:{friend}:push:android" in accepted
    assert not [k for k in accepted if victim in k and k != key]
    assert not s.fakes.smtp.ledger.accepted  # the queued email was never sent
    # Edges and counts.
    assert (await s.call("GET", f"/v1/users/{author}"))[1]["followers"] == 0
    assert (await s.call("GET", f"/v1/users/{star}"))[1]["followers"] == 2
    for fan in fans:
        assert (await s.call("GET", f"/v1/users/{fan}"))[1]["following"] == 1
    victim_user = (await s.call("GET", f"/v1/users/{victim}"))[1]
    assert (victim_user["followers"], victim_user["following"]) == (0, 0)
    assert (await s.call("GET", f"/v1/users/{victim}/followers"))[1]["items"] == []
    # Rows in the stores, not only what reads show.
    assert await api.rows(victim) == []
    for fan in fans:
        assert not {*own, late} & set(await api.rows(fan))
    since = rt.now_ms() - rt.settings.retention_ms
    assert await rt.store.author_events(victim, None, 100, since) == []
    assert [await rt.store.get_event(e) for e in [*own, late, direct]] == [None] * 4
    assert direct not in await api.rows(friend)
    assert both in await api.rows(friend)
    assert await rt.delivery.log.records(notified, victim) == []
    assert await rt.delivery.once.claim(claim_key(notified, victim, "push", "android"),
                                        "probe", 1) == "claimed"
    assert await rt.recipients.contacts(victim) is None
    assert await rt.recipients.preferences(victim) is None
    assert await rt.policy.reads.seen(victim) is None
    message_id = s.fakes.fcm.ledger.message_ids[key]
    assert await rt.policy.receipts.find("fcm", message_id) is None
    assert await rt.policy.erasures.delivery_events(victim, 10) == []
    # The friend's own notification of the author's event is still there.
    assert [r.status for r in await rt.delivery.log.records(both, friend)] == ["sent"]

    # Asking again changes nothing; an unknown user has no erasure.
    status, body = await s.call("DELETE", f"/v1/users/{victim}")
    assert status == 202 and body["state"] == "done"
    assert (await s.call("GET", f"/v1/users/{api.user('nobody')}/erasure"))[0] == 404
    assert (await s.call("DELETE", "/v1/users/a%20b"))[0] == 400


async def test_an_erased_celebrity_leaves_pulls_and_badges_at_once(setup: Setup) -> None:
    s, api, rt = setup, setup.api, setup.api.rt
    star, other = api.user("star"), api.user("other")
    fans = [api.user(f"fan{i}") for i in range(3)]
    await api.bulk([(f, star) for f in fans] + [(fans[0], other)])
    await api.drain()
    pulled = [await api.post_ok(star) for _ in range(2)]
    kept = await api.post_ok(other)
    await api.drain()
    assert set(pulled) <= set(await api.inbox_ids(fans[0]))
    assert not set(pulled) & set(await api.rows(fans[0]))  # pulled at read time, not pushed
    badge = await s.call("GET", "/v1/inbox/unread_count", headers=api.token(fans[0]))
    assert badge == (200, {"count": 3, "capped": False})

    assert (await s.call("DELETE", f"/v1/users/{star}"))[0] == 202
    assert await api.inbox_ids(fans[0]) == [kept]
    badge = await s.call("GET", "/v1/inbox/unread_count", headers=api.token(fans[0]))
    assert badge == (200, {"count": 1, "capped": False})
    status, body = await s.call("POST", "/v1/inbox/seen", {"up_to": pulled[0]},
                                headers=api.token(fans[1]))
    assert status == 200  # an erased event id is still a place in time until removed
    await s.deliver_all()
    assert (await s.call("GET", f"/v1/users/{star}/erasure"))[1]["state"] == "done"
    since = rt.now_ms() - rt.settings.retention_ms
    assert await rt.store.author_events(star, None, 10, since) == []
    assert await api.inbox_ids(fans[0]) == [kept]
    status, body = await s.call("POST", "/v1/inbox/seen", {"up_to": pulled[1]},
                                headers=api.token(fans[1]))
    assert (status, body["error"]["field"]) == (422, "up_to")  # gone: no longer a place
    for fan in fans:
        assert (await s.call("GET", f"/v1/users/{fan}"))[1]["following"] == (
            1 if fan == fans[0] else 0)


async def test_a_job_whose_queue_entry_was_lost_is_resumed(setup: Setup) -> None:
    s, api, rt = setup, setup.api, setup.api.rt
    victim, author = api.user("victim"), api.user("author")
    await api.follow(victim, author)
    assert (await s.call("DELETE", f"/v1/users/{victim}"))[0] == 202
    await lose_queue(rt)  # the job's task is gone with the Redis entries
    await s.deliver_all()
    status, body = await s.call("GET", f"/v1/users/{victim}/erasure")
    assert (status, body["state"]) == (200, "queued")
    assert await erasure.resume_stalled(rt) == 0  # not stalled for a minute yet
    assert await erasure.resume_stalled(rt, stalled_ms=0) >= 1
    await s.deliver_all()
    assert (await s.call("GET", f"/v1/users/{victim}/erasure"))[1]["state"] == "done"
    assert (await s.call("GET", f"/v1/users/{author}"))[1]["followers"] == 0
    assert victim not in await rt.policy.erasures.pending()


async def test_a_slow_chain_taken_for_a_lost_one_stops(setup: Setup) -> None:
    """A job queued again because it looked stalled replaces its chain: a task of the old
    chain, still queued somewhere, does nothing, so two chains never run side by side."""
    s, api, rt = setup, setup.api, setup.api.rt
    victim, author = api.user("victim"), api.user("author")
    await api.follow(victim, author)
    assert (await s.call("DELETE", f"/v1/users/{victim}"))[0] == 202
    before = await rt.policy.erasures.status(victim)
    assert before is not None and before.generation == 0
    assert await erasure.resume_stalled(rt, stalled_ms=0) == 1  # the first task still queued
    after = await rt.policy.erasures.status(victim)
    assert after is not None and after.generation == 1
    await erasure.erase_step(rt, EraseTask(victim, before.step, 0))  # the old chain's task
    assert await rt.policy.erasures.status(victim) == after  # did nothing
    await s.deliver_all()
    final = await rt.policy.erasures.status(victim)
    assert final is not None and final.state == "done" and final.generation == 1
    assert (await s.call("GET", f"/v1/users/{author}"))[1]["followers"] == 0
