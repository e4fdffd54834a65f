"""Pure logic, no I/O: routing hysteresis, cursors, the merge, settings, auth, backoff."""

from __future__ import annotations

import argparse
import random
from collections.abc import AsyncIterator

import pytest
from redis.asyncio.connection import Connection

from feedsvc.auth import Principal, authenticate, issue_token
from feedsvc.config import Settings, parse_duration
from feedsvc.errors import (
    ConfigError,
    InvalidRequest,
    RetryableError,
    Unauthenticated,
    Unprocessable,
)
from feedsvc.graph import next_mode
from feedsvc.intake import parse_body, parse_created_at, validate
from feedsvc.model import InboxItem
from feedsvc.queue.redis import cluster_nodes, redis_errors
from feedsvc.seed import follow_pairs
from feedsvc.timeline import Cursor, decode_cursor, encode_cursor, merge
from feedsvc.workers import BACKOFF_CAP, backoff

SECRET = "unit-test-secret-0123456789abcdef0123"


@pytest.mark.parametrize(
    ("current", "followers", "expected"),
    [("push", 9, "push"), ("push", 10, "pull"), ("pull", 10, "pull"), ("pull", 9, "pull"),
     ("pull", 8, "push"), ("push", 0, "push")],
)
def test_next_mode_hysteresis(current: str, followers: int, expected: str) -> None:
    assert next_mode(current, followers, 10) == expected  # type: ignore[arg-type]


def test_threshold_zero_is_pure_pull() -> None:
    assert next_mode("push", 0, 0) == "pull"
    assert next_mode("pull", 0, 0) == "pull"


def test_cursor_round_trip_and_garbage() -> None:
    cursor = Cursor(1_700_000_000_123, "e-1", (1, 2**63 + 5))
    assert decode_cursor(encode_cursor(cursor)) == cursor
    for bad in ("%%%", "AAAA", "bm90IG1zZ3BhY2s"):
        with pytest.raises(InvalidRequest):
            decode_cursor(bad)


def _item(t: int, e: str) -> InboxItem:
    return InboxItem(event_id=e, author_id="a", kind="k", created_at=t, priority="medium",
                     payload="{}")


async def _iter(items: list[InboxItem]) -> AsyncIterator[InboxItem]:
    for item in items:
        yield item


async def test_merge_is_newest_first_across_sources() -> None:
    a = [_item(9, "x"), _item(5, "b"), _item(1, "a")]
    b = [_item(9, "y"), _item(5, "b"), _item(3, "c")]
    out = [(i.created_at, i.event_id, via) async for i, via in
           merge([(_iter(a), "push"), (_iter(b), "pull")])]
    assert [(t, e) for t, e, _ in out] == [(9, "y"), (9, "x"), (5, "b"), (5, "b"), (3, "c"),
                                           (1, "a")]


def test_settings_errors_name_the_variable() -> None:
    with pytest.raises(ConfigError, match="FEEDSVC_PORT"):
        Settings.load({"FEEDSVC_PORT": "http"})
    with pytest.raises(ConfigError, match="FEEDSVC_LOW_MAX_AGE"):
        Settings.load({"FEEDSVC_LOW_MAX_AGE": "soon"})
    with pytest.raises(ConfigError, match="FEEDSVC_INBOX_MAX"):
        Settings.load({"FEEDSVC_INBOX_MAX": "0"})
    with pytest.raises(ConfigError, match="--celebrity-threshold"):
        Settings.load({}, argparse.Namespace(celebrity_threshold="-1"))
    with pytest.raises(ConfigError, match="FEEDSVC_REDIS_URL"):
        Settings.load({"FEEDSVC_CASSANDRA_HOSTS": "127.0.0.1"}).check_backend()


def test_settings_defaults_and_parsing() -> None:
    s = Settings.load({"FEEDSVC_LOW_MAX_AGE": "90s", "FEEDSVC_CASSANDRA_HOSTS": "a:9042, b",
                       "FEEDSVC_SERVICE_KEYS": "k1,k2"})
    assert s.low_max_age == 90 and s.cassandra_hosts == ("a:9042", "b")
    assert s.service_keys == ("k1", "k2") and s.celebrity_threshold == 10_000
    assert s.inbox_max == 800 and s.inbox_ttl_days == 30 and (s.host, s.port) == ("127.0.0.1", 8080)
    assert parse_duration("1h") == 3600 and parse_duration("250ms") == 0.25


def test_auth_service_key_and_tokens() -> None:
    keys = ("svc",)
    assert authenticate("Bearer svc", keys, SECRET) == Principal(service=True)
    token = issue_token(SECRET, "alice", ttl_s=60)
    assert authenticate(f"Bearer {token}", keys, SECRET) == Principal(False, "alice")
    # Expired 20 s ago: within the 30 s skew allowance; 40 s ago: rejected.
    import time
    recent = issue_token(SECRET, "alice", ttl_s=10, now=time.time() - 30)
    assert authenticate(f"Bearer {recent}", keys, SECRET).user_id == "alice"
    stale = issue_token(SECRET, "alice", ttl_s=10, now=time.time() - 50)
    with pytest.raises(Unauthenticated):
        authenticate(f"Bearer {stale}", keys, SECRET)
    for header in (None, "", "Basic svc", "Bearer", "Bearer wrong",
                   f"Bearer {issue_token('another-secret-0123456789abcdef012', 'a')}"):
        with pytest.raises(Unauthenticated):
            authenticate(header, keys, SECRET)


def test_backoff_is_capped_full_jitter() -> None:
    rng = random.Random(3)
    values = [backoff(n, rng) for n in range(1, 30)]
    assert all(0 <= v <= BACKOFF_CAP for v in values)
    assert max(values) > 1.0


def test_body_hash_ignores_key_order_and_whitespace() -> None:
    _, h1 = parse_body(b'{"event_id": "e", "author_id": "a", "kind": "k", "payload": {"x": 1}}')
    _, h2 = parse_body(b'{"payload":{"x":1},"kind":"k","author_id":"a","event_id":"e"}')
    _, h3 = parse_body(b'{"payload":{"x":2},"kind":"k","author_id":"a","event_id":"e"}')
    assert h1 == h2 != h3


def test_created_at_forms() -> None:
    assert parse_created_at("2026-01-01T00:00:00Z", 0) == 1_767_225_600_000
    assert parse_created_at("2026-01-01T01:00:00.5+01:00", 0) == 1_767_225_600_500
    assert parse_created_at(123, 0) == 123
    for bad in ("2026-01-01", "2026-01-01T00:00:00", "yesterday"):
        with pytest.raises(Unprocessable):
            parse_created_at(bad, 0)


def test_validate_window() -> None:
    event, _ = parse_body(b'{"event_id": "e", "author_id": "a", "kind": "k", "payload": {},'
                          b' "created_at": 1000}')
    with pytest.raises(Unprocessable, match="older"):
        validate(event, now_ms=10_000_000, retention_ms=1_000_000)
    with pytest.raises(Unprocessable, match="future"):
        validate(event, now_ms=1000 - 5 * 60 * 1000 - 1, retention_ms=10)


def test_seed_graph_is_reproducible_and_skewed() -> None:
    one = list(follow_pairs(2000, 10, 1.0, seed=7))
    assert one == list(follow_pairs(2000, 10, 1.0, seed=7))
    assert one != list(follow_pairs(2000, 10, 1.0, seed=8))
    assert all(f != a for f, a in one)
    reach: dict[str, int] = {}
    for _, author in one:
        reach[author] = reach.get(author, 0) + 1
    ranked = sorted(reach.values(), reverse=True)
    assert ranked[0] > 20 * ranked[len(ranked) // 2]  # power law: a few authors dominate


def test_a_cluster_url_names_every_startup_node() -> None:
    assert cluster_nodes("redis://10.0.0.1:7000,10.0.0.2:7001,10.0.0.3/0") == (
        "redis://10.0.0.1:7000/0", [("10.0.0.1", 7000), ("10.0.0.2", 7001), ("10.0.0.3", 6379)])
    assert cluster_nodes("redis://:pw@h1:7000,h2:7000") == (
        "redis://:pw@h1:7000", [("h1", 7000), ("h2", 7000)])
    assert cluster_nodes("redis://h1:7000/0") == ("redis://h1:7000/0", [("h1", 7000)])


async def test_a_connection_lost_under_a_command_is_redis_unavailable() -> None:
    """Seen on the cluster when a primary was SIGKILLed: redis-py's write on a connection
    that died under it raised RuntimeError (uvloop: "the handler is closed") or
    AttributeError (the cluster client had dropped the connection: no writer), each a 500
    on POST /v1/events. Raised inside redis-py they are Redis being unavailable (503, or
    the outbox sweeper's job); the same errors raised by our own code are bugs."""
    dropped = Connection()  # never connected, as one the client dropped: no writer
    with pytest.raises(RetryableError, match="connection lost"), redis_errors():
        await dropped._send_packed_command([b"PING\r\n"])
    with pytest.raises(AttributeError), redis_errors():
        raise AttributeError("a bug of ours")
    with pytest.raises(RuntimeError), redis_errors():
        raise RuntimeError("the handler is closed, but not in redis-py")
