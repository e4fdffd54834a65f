"""Inbox read state through HTTP on both backends: ``POST /v1/inbox/seen`` and the unread
badge, with pushed rows, celebrity pulls, collapsed objects, own events and the cap."""

from __future__ import annotations

from typing import Any

from feedsvc.model import InboxItem
from tests.apiclient import Api
from tests.conftest import MakeApi


async def unread(api: Api, user: str) -> dict[str, Any]:
    response = await api.client.get("/v1/inbox/unread_count", headers=api.token(user))
    assert response.status == 200, await response.text()
    body: dict[str, Any] = await response.json()
    return body


async def seen(api: Api, user: str, up_to: Any) -> tuple[int, dict[str, Any]]:
    response = await api.client.post("/v1/inbox/seen", json={"up_to": up_to},
                                     headers=api.token(user))
    return response.status, await response.json()


async def test_unread_counts_pushed_pulled_and_collapsed_items(make_api: MakeApi) -> None:
    api = await make_api(celebrity_threshold=3)
    reader, author, star = api.user("reader"), api.user("author"), api.user("star")
    fans = [api.user(f"fan{i}") for i in range(2)]
    await api.bulk([(reader, author), (reader, star)] + [(f, star) for f in fans])
    await api.drain()
    assert await unread(api, reader) == {"count": 0, "capped": False}
    own = await api.post_ok(reader)
    pushed = [await api.post_ok(author) for _ in range(2)]
    await api.post_ok(author, object_id="doc")
    newest_push = await api.post_ok(author, object_id="doc")  # collapses with the one before
    pulled = [await api.post_ok(star) for _ in range(2)]
    await api.drain()
    shown = await api.inbox_ids(reader)
    assert set(shown) == {*pushed, newest_push, *pulled, own}
    assert shown[:2] == pulled[::-1]
    assert await unread(api, reader) == {"count": 5, "capped": False}  # not their own

    # Seen up to the second newest item: only the newest star event is left unread.
    status, body = await seen(api, reader, shown[1])
    assert (status, body) == (200, {"count": 1, "capped": False})
    status, body = await seen(api, reader, shown[0])
    assert (status, body) == (200, {"count": 0, "capped": False})
    # The mark never moves back: an older event id changes nothing.
    assert (await seen(api, reader, pushed[0]))[1] == {"count": 0, "capped": False}
    later = await api.post_ok(star)  # a pull event after the mark counts
    await api.drain()
    assert await unread(api, reader) == {"count": 1, "capped": False}
    assert (await seen(api, reader, later))[1]["count"] == 0


async def test_seen_up_to_a_cursor_and_the_cap(make_api: MakeApi) -> None:
    api = await make_api()
    reader, author = api.user("reader"), api.user("author")
    await api.follow(reader, author)
    now = api.rt.now_ms()
    items = [InboxItem(f"{api.prefix}-row{i:03d}", author, "post", now - 1000 * i, "medium",
                       "{}") for i in range(130)]
    for item in items:
        await api.rt.store.write_inbox([reader], item, 3600)
    assert await unread(api, reader) == {"count": 99, "capped": True}
    # Seen up to the cursor after the first 40 items: its position is the 40th item, so
    # that one and the 90 older ones are seen.
    page = await api.page(reader, limit=40)
    status, body = await seen(api, reader, page["next_cursor"])
    assert (status, body) == (200, {"count": 39, "capped": False})
    # By a service key, naming the reader.
    response = await api.client.get("/v1/inbox/unread_count", params={"user_id": reader},
                                    headers=api.service)
    assert await response.json() == {"count": 39, "capped": False}


async def test_read_state_bad_input_is_4xx(make_api: MakeApi) -> None:
    api = await make_api()
    reader, other = api.user("reader"), api.user("other")
    for up_to in ("no-such-event", "", 5, None, "x" * 3000):
        status, body = await seen(api, reader, up_to)
        assert status == 422, (up_to, body)
    response = await api.client.post("/v1/inbox/seen", json={"up_to": "a", "extra": 1},
                                     headers=api.token(reader))
    assert response.status == 422
    response = await api.client.post("/v1/inbox/seen", data=b"{", headers={
        **api.token(reader), "Content-Type": "application/json"})
    assert response.status == 400
    response = await api.client.get("/v1/inbox/unread_count", headers=api.service)
    assert response.status == 422  # a service key must name the user
    response = await api.client.get("/v1/inbox/unread_count", params={"user_id": other},
                                    headers=api.token(reader))
    assert response.status == 403
    response = await api.client.get("/v1/inbox/unread_count")
    assert response.status == 401
    assert await api.rt.policy.reads.seen(reader) is None  # nothing was marked
