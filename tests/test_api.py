"""The HTTP contract, end to end on both backends: validation, auth, idempotency, routing,
the read merge, follow semantics, threshold crossings, priority and bounded storage."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from feedsvc.workers import run_consumer, run_workers
from tests.conftest import MakeApi

# --- validation and auth ------------------------------------------------------------------

GOOD = {"event_id": "ok-1", "author_id": "a", "kind": "post", "payload": {"x": 1}}


def body(**changes: Any) -> bytes:
    value = dict(GOOD)
    for key, new in changes.items():
        if new is None:
            value.pop(key, None)
        else:
            value[key] = new
    return json.dumps(value, separators=(",", ":")).encode()


def short_id(n: int) -> str:
    """Distinct ids of 1-3 characters, so 10,001 of them fit in a 64 KiB body."""
    alphabet = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    out = ""
    while True:
        n, r = divmod(n, 62)
        out = alphabet[r] + out
        if n == 0:
            return out


BAD_BODIES: list[tuple[bytes, int, str]] = [
    (b"{not json", 400, "invalid_json"),
    (b"[1, 2]", 400, "invalid_json"),
    (b"", 400, "invalid_json"),
    (body(event_id=None), 422, "missing_field"),
    (body(extra=1), 422, "unknown_field"),
    (body(event_id="has space"), 422, "invalid_field"),
    (body(event_id="x" * 129), 422, "invalid_field"),
    (body(author_id=""), 422, "invalid_field"),
    (body(author_id="a" * 65), 422, "invalid_field"),
    (body(author_id="a/b"), 422, "invalid_field"),
    (body(kind=""), 422, "invalid_field"),
    (body(kind=7), 422, "invalid_field"),
    (body(priority="urgent"), 422, "invalid_field"),
    (body(payload=[1]), 422, "invalid_field"),
    (body(payload={"x": "y" * 5000}), 422, "payload_too_large"),
    (body(created_at="yesterday"), 422, "invalid_field"),
    (body(created_at=True), 422, "invalid_field"),
    (body(created_at=1000), 422, "too_old"),
    (body(created_at=4_102_444_800_000), 422, "in_future"),
    (body(audience={"users": []}), 422, "invalid_field"),
    (body(audience={"users": ["ok", "not ok"]}), 422, "invalid_field"),
    (body(audience={"users": [short_id(i) for i in range(10_001)]}), 422,
     "audience_too_large"),
    (body(audience={"people": ["x"]}), 422, "unknown_field"),
    (body(object_id=""), 422, "invalid_field"),
]


async def test_bad_events_get_4xx_and_change_nothing(make_api: MakeApi) -> None:
    api = await make_api()
    for raw, status, code in BAD_BODIES:
        response = await api.client.post("/v1/events", data=raw, headers=api.json)
        error = (await response.json())["error"]
        assert (response.status, error["code"]) == (status, code), raw[:80]
        assert error["message"] and "field" in error
    assert await api.rt.store.get_event("ok-1") is None
    assert sum((await api.rt.queue.stats()).depth.values()) == 0


async def test_oversized_body_is_413_without_reading_it(make_api: MakeApi) -> None:
    api = await make_api()
    big = b'{"event_id": "big", "author_id": "a", "kind": "k", "payload": {"x": "' + \
        b"y" * (70 * 1024) + b'"}}'
    response = await api.client.post("/v1/events", data=big, headers=api.json)
    assert response.status == 413
    assert (await response.json())["error"]["code"] == "payload_too_large"

    async def chunks() -> Any:  # no Content-Length: the limit applies while reading
        for _ in range(80):
            yield b"x" * 1024

    response = await api.client.post("/v1/events", data=chunks(), headers=api.json)
    assert response.status == 413
    assert await api.rt.store.get_event("big") is None


async def test_auth_rules(make_api: MakeApi) -> None:
    api = await make_api()
    alice, bob = api.user("alice"), api.user("bob")
    c = api.client
    assert (await c.get("/v1/inbox")).status == 401
    assert (await c.get("/v1/inbox", headers={"Authorization": "Bearer nope"})).status == 401
    expired = api.token(alice, ttl_s=-60)
    assert (await c.get("/v1/inbox", headers=expired)).status == 401
    assert (await c.post("/v1/events", json=GOOD, headers=api.token(alice))).status == 403
    assert (await c.put(f"/v1/users/{alice}/following/{bob}",
                        headers=api.token(alice))).status == 403
    response = await c.get("/v1/inbox", params={"user_id": bob}, headers=api.token(alice))
    assert response.status == 403
    response = await c.get("/v1/inbox", headers=api.service)
    assert response.status == 422
    response = await c.get("/v1/inbox", params={"user_id": bob}, headers=api.service)
    assert response.status == 200
    assert (await c.get(f"/v1/users/{bob}/events", headers=api.token(alice))).status == 200
    for path in ("/healthz", "/readyz", "/openapi.json"):
        assert (await c.get(path)).status == 200
    assert (await c.get("/nowhere")).status == 404
    assert (await c.patch("/v1/inbox", headers=api.service)).status == 405
    for bad in ({"limit": "0"}, {"limit": "201"}, {"limit": "x"}, {"cursor": "garbage!"}):
        response = await c.get("/v1/inbox", params=bad, headers=api.token(alice))
        assert response.status == 400, bad


async def test_idempotency(make_api: MakeApi) -> None:
    api = await make_api()
    author, fan = api.user("author"), api.user("fan")
    await api.follow(fan, author)
    payload = {"event_id": f"{api.prefix}-once", "author_id": author, "kind": "post",
               "payload": {"b": 2, "a": 1}}
    first = await api.client.post("/v1/events", json=payload, headers=api.service)
    assert first.status == 202 and (await first.json())["status"] == "accepted"
    reordered = json.dumps({k: payload[k] for k in reversed(list(payload))})
    again = await api.client.post("/v1/events", data=reordered, headers=api.json)
    assert again.status == 200
    assert await again.json() == {"event_id": payload["event_id"], "status": "duplicate"}
    changed = dict(payload, payload={"a": 1, "b": 3})
    reused = await api.client.post("/v1/events", json=changed, headers=api.service)
    assert reused.status == 422
    assert (await reused.json())["error"]["code"] == "idempotency_key_reused"
    await api.drain()
    assert await api.rows(fan) == [payload["event_id"]]
    items = await api.inbox(fan)
    assert [i["payload"] for i in items] == [{"b": 2, "a": 1}]


# --- routing ------------------------------------------------------------------------------


async def test_push_writes_exactly_one_row_per_follower(make_api: MakeApi) -> None:
    api = await make_api(celebrity_threshold=10_000)
    author = api.user("author")
    fans = [api.user(f"f{i}") for i in range(1_234)]
    assert await api.bulk([(f, author) for f in fans]) == len(fans)
    event = {"event_id": f"{api.prefix}-big", "author_id": author, "kind": "post",
             "payload": {}}
    first = await api.client.post("/v1/events", json=event, headers=api.service)
    assert (await first.json())["route"] == "push"
    event_id = event["event_id"]
    await api.drain()
    again = await api.client.post("/v1/events", json=event, headers=api.service)
    assert again.status == 200  # a duplicate changes nothing
    await api.drain()
    counts = await asyncio.gather(*(api.rows(f) for f in fans))
    assert all(rows == [event_id] for rows in counts)
    assert await api.rows(author) == [event_id]  # the author's own inbox
    assert await api.rows(api.user("stranger")) == []


async def test_pull_writes_no_follower_rows(make_api: MakeApi) -> None:
    api = await make_api(celebrity_threshold=5)
    star = api.user("star")
    fans = [api.user(f"f{i}") for i in range(6)]
    await api.bulk([(f, star) for f in fans])
    status, accepted = await api.post(star)
    assert (status, accepted["route"]) == (202, "pull")
    await api.drain()
    for fan in fans:
        assert await api.rows(fan) == []
        (item,) = await api.inbox(fan)
        assert (item["event_id"], item["via"]) == (accepted["event_id"], "pull")
    assert await api.inbox_ids(api.user("stranger")) == []


async def test_direct_reaches_exactly_its_audience(make_api: MakeApi) -> None:
    api = await make_api(celebrity_threshold=3)
    star = api.user("star")  # a celebrity: direct events must not leak through pulls
    fans = [api.user(f"f{i}") for i in range(4)]
    await api.bulk([(f, star) for f in fans])
    outsider = api.user("outsider")
    status, accepted = await api.post(star, audience={"users": [fans[0], outsider, fans[0]]})
    assert (status, accepted["route"]) == (202, "direct")
    await api.drain()
    assert await api.inbox_ids(fans[0]) == [accepted["event_id"]]
    assert await api.inbox_ids(outsider) == [accepted["event_id"]]
    for fan in fans[1:]:
        assert await api.inbox_ids(fan) == []
    response = await api.client.get(f"/v1/users/{star}/events", headers=api.service)
    assert (await response.json())["items"] == []
    await api.follow(api.user("late"), star)
    await api.drain()
    assert await api.inbox_ids(api.user("late")) == []


# --- the read merge -----------------------------------------------------------------------


async def test_merge_order_dedup_collapse_and_own_events(make_api: MakeApi) -> None:
    api = await make_api(celebrity_threshold=3)
    reader, friend, star = api.user("reader"), api.user("friend"), api.user("star")
    await api.bulk([(reader, friend), (reader, star)] +
                   [(api.user(f"x{i}"), star) for i in range(3)])
    now = api.rt.now_ms()
    posted = []
    for i in range(12):
        author = (friend, star, reader)[i % 3]
        posted.append((now - 60_000 + i * 1000, await api.post_ok(
            author, created_at=now - 60_000 + i * 1000)))
    # Three updates of one object: only the newest may show.
    obj = [await api.post_ok(friend, object_id="doc-1", created_at=now - 100_000 + i)
           for i in range(3)]
    await api.drain()
    items = await api.inbox(reader, limit=4)
    ids = [i["event_id"] for i in items]
    expected = [e for _, e in sorted(posted, reverse=True)] + [obj[-1]]
    assert ids == expected
    assert len(set(ids)) == len(ids)
    vias = {i["author_id"]: i["via"] for i in items}
    assert vias == {friend: "push", star: "pull", reader: "push"}
    stamps = [i["created_at"] for i in items]
    assert all(s.endswith("Z") and len(s) == 24 for s in stamps)
    assert stamps == sorted(stamps, reverse=True)


async def test_object_collapse_holds_across_pages(make_api: MakeApi) -> None:
    api = await make_api()
    reader, friend = api.user("reader"), api.user("friend")
    await api.follow(reader, friend)
    now = api.rt.now_ms()
    newest = await api.post_ok(friend, object_id="o", created_at=now - 1_000)
    plain = [await api.post_ok(friend, created_at=now - 2_000 - i) for i in range(5)]
    older = await api.post_ok(friend, object_id="o", created_at=now - 10_000)
    await api.drain()
    ids = await api.inbox_ids(reader, limit=2)
    assert ids == [newest, *plain]
    assert older not in ids


async def test_cursor_pages_are_stable_while_events_arrive(make_api: MakeApi) -> None:
    api = await make_api(celebrity_threshold=3)
    reader, friend, star = api.user("reader"), api.user("friend"), api.user("star")
    await api.bulk([(reader, friend), (reader, star)] +
                   [(api.user(f"x{i}"), star) for i in range(3)])
    now = api.rt.now_ms()
    for i in range(20):
        await api.post_ok((friend, star)[i % 2], created_at=now - 100_000 + i * 1000)
    await api.drain()
    first = await api.page(reader, limit=7)
    before = await api.inbox_ids(reader, limit=7)
    for i in range(5):  # newer arrivals between page requests
        await api.post_ok((friend, star)[i % 2], created_at=now - 1000 + i)
    await api.drain()
    seen = [i["event_id"] for i in first["items"]]
    cursor = first["next_cursor"]
    while cursor:
        body = await api.page(reader, limit=7, cursor=cursor)
        seen += [i["event_id"] for i in body["items"]]
        cursor = body["next_cursor"]
    assert seen == before  # nothing repeated, nothing skipped


# --- follow and unfollow ------------------------------------------------------------------


async def test_follow_backfills_and_unfollow_hides_at_once(make_api: MakeApi) -> None:
    api = await make_api()
    reader, author = api.user("reader"), api.user("author")
    now = api.rt.now_ms()
    events = [await api.post_ok(author, created_at=now - 100_000 + i) for i in range(25)]
    await api.drain()
    await api.follow(reader, author)
    await api.follow(reader, author)  # idempotent
    await api.drain()
    assert await api.inbox_ids(reader) == list(reversed(events))[:20]
    response = await api.client.get(f"/v1/users/{author}", headers=api.service)
    assert (await response.json())["followers"] == 1

    await api.unfollow(reader, author)
    assert await api.inbox_ids(reader) == []  # hidden before any job runs
    assert len(await api.rows(reader)) == 20
    await api.drain()
    assert await api.rows(reader) == []  # the job removed the pushed rows
    await api.unfollow(reader, author)  # idempotent
    response = await api.client.get(f"/v1/users/{author}", headers=api.service)
    assert (await response.json())["followers"] == 0


async def test_following_a_celebrity_shows_retained_events_at_once(make_api: MakeApi) -> None:
    api = await make_api(celebrity_threshold=3)
    star = api.user("star")
    await api.bulk([(api.user(f"x{i}"), star) for i in range(3)])
    events = [await api.post_ok(star) for _ in range(30)]
    reader = api.user("reader")
    await api.follow(reader, star)
    assert set(await api.inbox_ids(reader)) == set(events)  # no worker has run


async def test_user_counts_and_follower_pages(make_api: MakeApi) -> None:
    api = await make_api(celebrity_threshold=10)
    star = api.user("star")
    fans = sorted(api.user(f"f{i:02d}") for i in range(12))
    await api.bulk([(f, star) for f in fans])
    response = await api.client.get(f"/v1/users/{star}", headers=api.service)
    assert await response.json() == {"user_id": star, "followers": 12, "following": 0,
                                     "celebrity": True}
    got: list[str] = []
    cursor = None
    while True:
        params = {"limit": "5"} | ({"cursor": cursor} if cursor else {})
        response = await api.client.get(f"/v1/users/{star}/followers", params=params,
                                        headers=api.service)
        page = await response.json()
        got += page["items"]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert sorted(got) == fans
    response = await api.client.get(f"/v1/users/{fans[0]}/following", headers=api.service)
    assert (await response.json())["items"] == [star]
    response = await api.client.put(f"/v1/users/{star}/following/{star}", headers=api.service)
    assert response.status == 422


# --- threshold crossings ------------------------------------------------------------------


async def test_threshold_crossings_lose_and_duplicate_nothing(make_api: MakeApi) -> None:
    api = await make_api(celebrity_threshold=10)
    author = api.user("author")
    pool = [api.user(f"p{i:02d}") for i in range(12)]
    posted: list[str] = []
    routes: list[str] = []

    async def post() -> None:
        status, accepted = await api.post(author)
        assert status == 202
        posted.append(accepted["event_id"])
        routes.append(accepted["route"])

    async def check(followers: list[str]) -> None:
        await api.drain()
        for user in pool:
            ids = await api.inbox_ids(user, limit=7)
            assert len(ids) == len(set(ids)), f"{user} sees a duplicate"
            if user in followers:
                assert set(ids) == set(posted), f"{user} misses events"
            else:
                assert ids == [], f"{user} sees an author they do not follow"

    following: list[str] = []
    for user in pool:  # up across the threshold (10) ...
        await api.follow(user, author)
        following.append(user)
        await post()
        if len(following) % 3 == 0:
            await check(following)
    for user in pool[:5]:  # ... and down below 90% of it (9): 12 -> 7 followers
        await api.unfollow(user, author)
        following.remove(user)
        await post()
        await check(following)
    assert routes[:9] == ["push"] * 9
    assert "pull" in routes[9:12] and routes[-1] == "push"
    await check(following)


# --- priority, shedding, bounded storage --------------------------------------------------


async def test_high_priority_overtakes_a_low_backlog(make_api: MakeApi) -> None:
    api = await make_api(celebrity_threshold=10_000)
    author, fan = api.user("author"), api.user("fan")
    await api.bulk([(fan, author)] + [(api.user(f"f{i}"), author) for i in range(20)])
    for _ in range(150):
        await api.post_ok(author, priority="low")
    urgent = await api.post_ok(author, priority="high")
    stop = asyncio.Event()
    worker = asyncio.create_task(run_consumer(api.rt, "solo", stop, block_s=0.1))
    try:
        for _ in range(600):
            rows = await api.rows(fan)
            if urgent in rows:
                break
            await asyncio.sleep(0.05)
        low_left = (await api.rt.queue.stats()).depth["low"]
        assert urgent in await api.rows(fan)
        assert low_left > 100  # the high event did not wait for the backlog
    finally:
        stop.set()
        await worker
    await api.drain()
    assert len(await api.rows(fan)) == 151


async def test_stopping_workers_ends_every_consumer_first(make_api: MakeApi) -> None:
    """SIGTERM cancels ``run_workers`` while its consumers are busy fanning out; by the time
    it has ended, so has every consumer (and every page write they started), with the
    queue and store still open: none is left to meet closed connections."""
    api = await make_api(celebrity_threshold=10_000)
    author = api.user("author")
    await api.bulk([(api.user(f"f{i}"), author) for i in range(1_000)])
    for _ in range(80):
        await api.post_ok(author)
    before = asyncio.all_tasks()
    workers = asyncio.create_task(run_workers(api.rt, 8, asyncio.Event()))
    await asyncio.sleep(0.3)  # consumers in the middle of fan-outs
    workers.cancel()
    with pytest.raises(asyncio.CancelledError):
        await workers
    left = [t for t in asyncio.all_tasks() - before if t is not workers and not t.done()]
    assert left == []
    assert (await api.rt.queue.stats()).depth["medium"] > 0  # stopped mid-way, not drained


async def test_stale_low_events_are_shed(make_api: MakeApi) -> None:
    api = await make_api(low_max_age=0.2)
    author, fan = api.user("author"), api.user("fan")
    await api.follow(fan, author)
    await api.drain()  # the (empty) backfill
    stale = await api.post_ok(author, priority="low")
    await asyncio.sleep(0.4)
    kept = await api.post_ok(author, priority="medium")
    await api.drain()
    assert await api.rows(fan) == [kept]
    stats = await api.rt.queue.stats()
    assert stats.shed == 1
    (letter,) = await api.rt.queue.dead_letters(5)
    assert letter.reason == "shed"
    assert letter.envelope.task.event.event_id == stale  # type: ignore[union-attr]


async def test_inbox_keeps_the_newest_max_entries(make_api: MakeApi) -> None:
    api = await make_api(inbox_max=5)
    author, fan = api.user("author"), api.user("fan")
    await api.follow(fan, author)
    now = api.rt.now_ms()
    events = [await api.post_ok(author, created_at=now - 50_000 + i) for i in range(12)]
    await api.drain()
    assert await api.rows(fan) == list(reversed(events))[:5]


# --- the API description ------------------------------------------------------------------


async def test_openapi_lists_exactly_the_routes(make_api: MakeApi) -> None:
    api = await make_api()
    spec = await (await api.client.get("/openapi.json")).json()
    assert spec["openapi"].startswith("3.1")
    documented = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    served = set()
    assert api.client.app is not None
    for resource in api.client.app.router.resources():
        info = resource.get_info()
        path = info.get("formatter") or info.get("path")
        for route in resource:
            if route.method != "HEAD":
                served.add((route.method, path))
    assert documented == served


@pytest.mark.parametrize("path", ["/v1/users/a%20b", "/v1/users/" + "x" * 65 + "/events"])
async def test_bad_path_ids_are_4xx(make_api: MakeApi, path: str) -> None:
    api = await make_api()
    response = await api.client.get(path, headers=api.service)
    assert 400 <= response.status < 500


async def test_hostile_inputs_are_4xx_never_5xx(make_api: MakeApi) -> None:
    api = await make_api()
    c, user = api.client, api.user("reader")
    nested = b'{"event_id": "n", "author_id": "a", "kind": "k", "payload": ' + \
        b'{"a":' * 3000 + b"1" + b"}" * 3000 + b"}"
    huge = b'{"event_id": "h", "author_id": "a", "kind": "k", "payload": {"x": 1e400}}'
    for raw in (nested, huge, b"[" * 5000 + b"]" * 5000, b'"\\ud800"', b"\xff\xfe"):
        response = await c.post("/v1/events", data=raw, headers=api.json)
        assert response.status == 400, raw[:40]
        response = await c.post("/v1/follows/bulk", data=raw, headers=api.json)
        assert 400 <= response.status < 500
    from feedsvc.timeline import Cursor, encode_cursor
    hostile = [Cursor(2**62, "x"), Cursor(10**15, "x" * 500), Cursor(1, "x", (2**64 - 1,) * 101)]
    for cursor in hostile:
        for path in ("/v1/inbox", f"/v1/users/{user}/events"):
            response = await c.get(path, params={"cursor": encode_cursor(cursor)},
                                   headers=api.token(user))
            assert response.status == 400, (path, cursor)
    far = encode_cursor(Cursor(2**52, "x"))  # far in the future but in range: just a page
    response = await c.get("/v1/inbox", params={"cursor": far}, headers=api.token(user))
    assert response.status == 200
    for limit in ("²", "٣", "-1", "1e3", " 5"):
        response = await c.get("/v1/inbox", params={"limit": limit}, headers=api.token(user))
        assert response.status == 400, limit
    response = await c.get("/v1/inbox", headers={"Authorization": "Bearer \u00e9\u00e9"})
    assert response.status == 401


@pytest.mark.parametrize("make_runtime", ["cassandra"], indirect=True)
async def test_cassandra_rows_carry_the_retention_ttl(make_api: MakeApi) -> None:
    api = await make_api(inbox_ttl_days=2)
    author, fan = api.user("author"), api.user("fan")
    await api.follow(fan, author)
    await api.post_ok(author, created_at=api.rt.now_ms() - 86_400_000)  # one day left
    await api.drain()
    store: Any = api.rt.store
    ks = api.rt.settings.keyspace
    row = (await asyncio.to_thread(
        store.session.execute,
        f"SELECT TTL(item) AS ttl FROM {ks}.inbox_by_user WHERE user_id = %s", (fan,))).one()
    assert 86_400 - 120 < row.ttl <= 86_400


async def test_new_followers_of_a_fresh_celebrity_see_its_events_at_once(
    make_api: MakeApi,
) -> None:
    api = await make_api(celebrity_threshold=3)
    author = api.user("author")
    early = [api.user("e1"), api.user("e2")]
    await api.bulk([(u, author) for u in early])
    events = [await api.post_ok(author) for _ in range(3)]  # push: 2 followers
    await api.drain()
    late = api.user("late")
    await api.follow(late, author)  # the 3rd follower: now pull, so no backfill
    assert set(await api.inbox_ids(late)) == set(events)
    for user in early:
        assert await api.inbox_ids(user) == list(reversed(events))
