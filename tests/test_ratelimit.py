"""Rate limits: the token bucket as a pure function, and per service key / per user over
HTTP on both backends (in process with the embedded one, in Redis with Cassandra)."""

from __future__ import annotations

import pytest

from feedsvc.config import Settings
from feedsvc.errors import ConfigError
from feedsvc.ratelimit import Rate, take_token
from tests.conftest import MakeApi


def test_rates_parse() -> None:
    assert Rate.parse("20/s") == Rate(20, 1.0)
    assert Rate.parse("600/m") == Rate(600, 60.0)
    assert Rate.parse("5/10s") == Rate(5, 10.0)
    for bad in ("0/s", "x/s", "10", "10/d", "-1/s", "10/0s"):
        with pytest.raises(ValueError):
            Rate.parse(bad)
    assert Settings.load({"FEEDSVC_RATE_LIMIT_USER": "20/s"}).rate_limit_user == Rate(20, 1.0)
    with pytest.raises(ConfigError, match="FEEDSVC_RATE_LIMIT_SERVICE"):
        Settings.load({"FEEDSVC_RATE_LIMIT_SERVICE": "lots"})


def test_token_bucket() -> None:
    rate = Rate(2, 1.0)  # 2 a second, burst 2
    tokens, last = 2.0, 0.0
    first, tokens = take_token(tokens, last, 0.0, rate)
    second, tokens = take_token(tokens, 0.0, 0.0, rate)
    third, tokens = take_token(tokens, 0.0, 0.0, rate)
    assert (first.allowed, second.allowed, third.allowed) == (True, True, False)
    assert (second.remaining, third.retry_after_s) == (0, 1)
    later, tokens = take_token(tokens, 0.0, 0.5, rate)  # half a second refills one token
    assert later.allowed and later.remaining == 0
    full, _ = take_token(0.0, 0.0, 100.0, rate)  # never more than the burst
    assert full.allowed and full.remaining == 1 and full.reset_s == 1


async def test_user_limit_is_429_with_headers(make_api: MakeApi) -> None:
    api = await make_api(rate_limit_user=Rate(3, 60.0))
    alice, bob = api.user("alice"), api.user("bob")
    for remaining in (2, 1, 0):
        response = await api.client.get("/v1/inbox", headers=api.token(alice))
        assert response.status == 200
        assert response.headers["RateLimit-Limit"] == "3"
        assert response.headers["RateLimit-Remaining"] == str(remaining)
        assert response.headers["RateLimit-Policy"] == "3;w=60"
    response = await api.client.get("/v1/inbox", headers=api.token(alice))
    assert response.status == 429
    assert 1 <= int(response.headers["Retry-After"]) <= 20
    assert (await response.json())["error"]["code"] == "rate_limited"
    # another user has their own bucket; service keys are not limited here
    assert (await api.client.get("/v1/inbox", headers=api.token(bob))).status == 200
    response = await api.client.get("/v1/inbox", params={"user_id": alice},
                                    headers=api.service)
    assert response.status == 200 and "RateLimit-Limit" not in response.headers


async def test_a_rate_limited_request_changes_nothing(make_api: MakeApi) -> None:
    api = await make_api(rate_limit_service=Rate(1, 60.0))
    author = api.user("author")
    assert (await api.post(author))[0] == 202
    status, body = await api.post(author)
    assert (status, body["error"]["code"]) == (429, "rate_limited")
    assert await api.rt.store.get_event(f"{api.prefix}-e2") is None
    assert await api.rt.store.get_event(f"{api.prefix}-e1") is not None
