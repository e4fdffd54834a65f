"""The typed client (``feedsvc.client``) against the real API on both backends."""

from __future__ import annotations

import pytest

from feedsvc.client import FeedClient
from feedsvc.delivery.recipients import ContactsIn, DeviceIn, PreferencesIn
from feedsvc.errors import Forbidden, Unauthenticated, Unprocessable
from feedsvc.model import EventIn
from feedsvc.ratelimit import Rate
from tests.apiclient import Api
from tests.conftest import SERVICE_KEY, MakeApi


def base_url(api: Api) -> str:
    return str(api.client.make_url("/"))


async def test_post_follow_and_read_every_page(make_api: MakeApi) -> None:
    api = await make_api(celebrity_threshold=1_000)
    author, fan = api.user("author"), api.user("fan")
    async with FeedClient(base_url(api), credential=SERVICE_KEY) as feed:
        assert await feed.follow_bulk([(fan, author)]) == 1
        await feed.follow(api.user("other"), author)
        events = []
        for i in range(7):
            event = EventIn(event_id=f"{api.prefix}-c{i}", author_id=author, kind="post",
                            payload={"i": i})
            accepted = await feed.post_event(event)
            assert (accepted.status, accepted.route) == ("accepted", "push")
            events.append(event.event_id)
        again = await feed.post_event(EventIn(event_id=events[0], author_id=author,
                                              kind="post", payload={"i": 0}))
        assert again.status == "duplicate"
        await api.drain()
        pages = [page async for page in feed.read_inbox(user_id=fan, limit=3)]
        assert [len(p.items) for p in pages] == [3, 3, 1]
        assert [i.event_id for p in pages for i in p.items] == events[::-1]
        assert (await feed.user(author)).followers == 2
        await feed.unfollow(fan, author)
        assert (await feed.inbox_page(user_id=fan)).items == []


async def test_errors_are_the_error_tree(make_api: MakeApi) -> None:
    api = await make_api()
    async with FeedClient(base_url(api), credential=SERVICE_KEY) as feed:
        with pytest.raises(Unprocessable) as refused:
            await feed.post_event(EventIn(event_id=f"{api.prefix}-old", author_id="a",
                                          kind="post", payload={}, created_at=1))
        assert (refused.value.code, refused.value.field) == ("too_old", "created_at")
    user = api.user("u")
    async with FeedClient(base_url(api), credential=api.token(user)["Authorization"][7:]
                          ) as mine:
        with pytest.raises(Forbidden):
            await mine.inbox_page(user_id=api.user("someone-else"))
        out = await mine.put_device(user, "phone", DeviceIn(platform="fcm", token="t"))
        assert out.active
        assert [d.device_id for d in (await mine.devices(user)).items] == ["phone"]
        contacts = await mine.put_contacts(user, ContactsIn(email="u@example.com"))
        assert contacts.email_active and not contacts.phone_active
        prefs = await mine.put_preferences(user, PreferencesIn(locale="de"))
        assert (await mine.preferences(user)) == prefs
        await mine.delete_device(user, "phone")
    async with FeedClient(base_url(api), credential="not-a-key", retries=0) as stranger:
        with pytest.raises(Unauthenticated):
            await stranger.inbox_page(user_id="x")


async def test_429_is_retried_after_retry_after(make_api: MakeApi) -> None:
    api = await make_api(rate_limit_service=Rate.parse("3/s"))
    author = api.user("author")
    async with FeedClient(base_url(api), credential=SERVICE_KEY) as feed:
        for i in range(8):
            await feed.post_event(EventIn(event_id=f"{api.prefix}-r{i}", author_id=author,
                                          kind="post", payload={}))
        assert feed.retried > 0  # some answers were 429, and the client waited them out
