"""Hostile clients, end to end on both backends: every input a fuzzer or an attacker found
answering 500 (or accepted when it should not be) answers a 4xx with the JSON error body
and changes nothing; user-token rules; the id and RFC 3339 rules as pure functions."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jwt
import pytest
from aiohttp import ClientResponse
from yarl import URL

from feedsvc import intake
from feedsvc.auth import issue_token
from feedsvc.config import Settings
from feedsvc.errors import ConfigError, Unprocessable
from tests.apiclient import Api
from tests.conftest import JWT_SECRET, MakeApi


async def error_of(response: ClientResponse, status: int) -> dict[str, Any]:
    """Assert the status and the JSON error body; return its ``error`` object."""
    assert response.status == status, (response.status, await response.text())
    assert response.content_type == "application/json"
    error: dict[str, Any] = (await response.json())["error"]
    assert set(error) == {"code", "message", "field"} and error["message"]
    return error


def event(api: Api, **fields: Any) -> dict[str, Any]:
    value = {"event_id": f"{api.prefix}-ev", "author_id": api.user("author"), "kind": "post",
             "payload": {"x": 1}}
    value.update(fields)
    return value


async def nothing_stored(api: Api) -> None:
    assert await api.rt.store.get_event(f"{api.prefix}-ev") is None
    assert sum((await api.rt.queue.stats()).depth.values()) == 0


# --- the cases reproduced in the issue --------------------------------------------------


async def raw_request(api: Api, request: bytes) -> tuple[int, dict[str, Any]]:
    """Send bytes as they are (aiohttp's client would re-encode them); the status and body."""
    server = api.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(request)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        body = await reader.readexactly(length)
    finally:
        writer.close()
        await writer.wait_closed()
    assert b"application/json" in head.lower()
    return int(head.split()[1]), json.loads(body)


async def test_non_ascii_authorization_is_401_without_credentials(make_api: MakeApi) -> None:
    api = await make_api()
    cases = {b"\xff": 401, b"\xc3\xa9t\xc3\xa9": 401, b"\xed\xa0\x80": 401,
             b"a\x01b": 400}  # a control character is refused by the HTTP parser
    for credential, expected in cases.items():
        status, body = await raw_request(
            api, b"GET /v1/inbox HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + credential +
            b"\r\nConnection: close\r\n\r\n")
        code = "unauthenticated" if expected == 401 else "invalid_request"
        assert (status, body["error"]["code"]) == (expected, code), credential


async def test_invalid_utf8_in_json_strings_is_400(make_api: MakeApi) -> None:
    api = await make_api()
    bad_event = (b'{"event_id": "e\xff", "author_id": "a", "kind": "post", '
                 b'"payload": {"t": "\xc3\x28"}}')
    bad_bulk = b'{"follows": [{"user_id": "u\xfe", "author_id": "a"}]}'
    for path, raw in (("/v1/events", bad_event), ("/v1/follows/bulk", bad_bulk)):
        response = await api.client.post(path, data=raw, headers=api.json)
        assert (await error_of(response, 400))["code"] == "invalid_json"
    await nothing_stored(api)


async def test_enormous_limit_is_400_on_every_route(make_api: MakeApi) -> None:
    api = await make_api()
    user = api.user("u")
    digits = "9" * 4301
    for path in ("/v1/inbox", f"/v1/users/{user}/events", f"/v1/users/{user}/followers",
                 f"/v1/users/{user}/following"):
        response = await api.client.get(path, params={"limit": digits, "user_id": user},
                                         headers=api.service)
        error = await error_of(response, 400)
        assert error["field"] == "limit"


async def test_followers_cursor_with_non_ascii_digits_is_4xx(make_api: MakeApi) -> None:
    api = await make_api()
    user = api.user("u")
    # '²:x', '①:x', 'ÿÿ' are text an embedded store can page after (a 200 there, in user-id
    # order); the Cassandra store's cursor names a shard number. Cursors are unpadded.
    forged = ["wrI6eA", "4pGgOng", "w7_Dvw"]
    malformed = ["wrI6eA==", "%%%", "", "a" * 3000, "_w", "wrI6eA=", "/w=="]
    cassandra = not api.rt.settings.embedded
    for cursor in forged + malformed:
        response = await api.client.get(f"/v1/users/{user}/followers",
                                        params={"cursor": cursor}, headers=api.service)
        if cursor in malformed or cassandra:
            assert (await error_of(response, 400))["code"] == "invalid_cursor", cursor
        else:
            assert response.status == 200


async def test_follower_cursors_are_unpadded_and_round_trip(make_api: MakeApi) -> None:
    api = await make_api()
    author = api.user("author")
    fans = [api.user(f"fan{i:02d}") for i in range(7)]
    await api.bulk([(f, author) for f in fans])
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(10):
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        response = await api.client.get(f"/v1/users/{author}/followers", params=params,
                                        headers=api.service)
        assert response.status == 200
        page = await response.json()
        seen += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert "=" not in cursor
    assert sorted(seen) == sorted(fans)


async def test_duplicate_keys_are_400_and_change_nothing(make_api: MakeApi) -> None:
    api = await make_api()
    a, b = api.user("a"), api.user("b")
    raw = (f'{{"event_id": "{api.prefix}-ev", "author_id": "{a}", "kind": "post", '
           f'"payload": {{}}, "author_id": "{b}"}}').encode()
    nested = (f'{{"event_id": "{api.prefix}-ev", "author_id": "{a}", "kind": "post", '
              f'"payload": {{"k": 1, "k": 2}}}}').encode()
    for body in (raw, nested):
        response = await api.client.post("/v1/events", data=body, headers=api.json)
        assert (await error_of(response, 400))["code"] == "duplicate_key"
    bulk = f'{{"follows": [{{"user_id": "{a}", "user_id": "{b}", "author_id": "x"}}]}}'
    response = await api.client.post("/v1/follows/bulk", data=bulk, headers=api.json)
    assert (await error_of(response, 400))["code"] == "duplicate_key"
    await nothing_stored(api)
    assert (await api.rt.store.counts("x"))[0] == 0


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "application/jsonx", "multipart/form-data"])
async def test_json_routes_need_a_json_content_type(make_api: MakeApi,
                                                    content_type: str | None) -> None:
    api = await make_api()
    headers = dict(api.service)
    if content_type:
        headers["Content-Type"] = content_type
    raw = json.dumps(event(api)).encode()
    for path in ("/v1/events", "/v1/follows/bulk"):
        response = await api.client.post(path, data=raw, headers=headers,
                                         skip_auto_headers=["Content-Type"])
        error = await error_of(response, 415)
        assert error["code"] == "unsupported_media_type"
    await nothing_stored(api)


async def test_json_content_type_may_carry_parameters(make_api: MakeApi) -> None:
    api = await make_api()
    response = await api.client.post(
        "/v1/events", data=json.dumps(event(api)).encode(),
        headers={**api.service, "Content-Type": "application/json; charset=utf-8"})
    assert response.status == 202


BAD_IDS = ["..", ".", ".hidden", "a\u0085b", "a\u0080", "a\u009f", "a\u202ab", "a\u202eb",
           "a\u2066b", "a\u2069b", "a\u200bb", "a\u200db", "a\ufeffb", "a\u00a0b", "a\nb",
           "a\n", "a/b", "a b", "", "x" * 65, "a\u2028b"]
GOOD_IDS = ["a", "a..b", "user.name", "é", "ユーザー", "a:b", "x" * 64, "a-b_c"]


def test_the_id_rule() -> None:
    for bad in BAD_IDS:
        assert not intake.valid_id(bad), repr(bad)
    for good in GOOD_IDS:
        assert intake.valid_id(good), repr(good)


async def test_bad_ids_are_refused_everywhere(make_api: MakeApi) -> None:
    api = await make_api()
    ok = api.user("ok")
    for bad in BAD_IDS:
        response = await api.client.post("/v1/events", json=event(api, author_id=bad),
                                         headers=api.service)
        error = await error_of(response, 422)
        assert error["field"] == "author_id", (bad, error)
        response = await api.client.post("/v1/events", json=event(
            api, audience={"users": [ok, bad]}), headers=api.service)
        assert (await error_of(response, 422))["field"] == "audience.users[1]"
        response = await api.client.post("/v1/follows/bulk", json={"follows": [
            {"user_id": ok, "author_id": ok + "2"}, {"user_id": bad, "author_id": ok}]},
            headers=api.service)
        assert (await error_of(response, 422))["field"] == "follows[1].user_id"
        response = await api.client.get("/v1/inbox", params={"user_id": bad},
                                        headers=api.service)
        assert (await error_of(response, 400))["field"] == "user_id"
        if bad and "/" not in bad and bad not in (".", ".."):  # these route elsewhere
            path = f"/v1/users/{ok}/following/{quote(bad, safe='')}"
            response = await api.client.put(URL(path, encoded=True), headers=api.service)
            assert (await error_of(response, 400))["field"] == "author_id", repr(bad)
    await nothing_stored(api)
    assert await api.rt.store.counts(ok) == (0, 0)


async def test_good_ids_are_accepted(make_api: MakeApi) -> None:
    api = await make_api()
    for i, good in enumerate(GOOD_IDS):
        response = await api.client.post("/v1/events", json=event(
            api, event_id=f"{api.prefix}-g{i}", author_id=good), headers=api.service)
        assert response.status == 202, (good, await response.text())


def test_created_at_is_exactly_rfc3339() -> None:
    now = 1_800_000_000_000
    cases = {
        "2026-12-01T10:20:30Z": 1796120430000,
        "2026-12-01t10:20:30z": 1796120430000,
        "2026-12-01T10:20:30.5Z": 1796120430500,
        "2026-12-01T10:20:30.123456789+00:00": 1796120430123,
        "2026-12-01T11:20:30+01:00": 1796120430000,
        "2026-12-01T05:20:30-05:00": 1796120430000,
        "2016-12-31T23:59:60Z": 1483228800000,  # a leap second is the next second
    }
    for text, ms in cases.items():
        assert intake.parse_created_at(text, now) == ms, text
    for bad in ("2026-W48-2T10:00:00Z", "20261201T102030Z", "2026-12-01T10Z", "2026-12-01",
                "2026-12-01 10:20:30Z", "2026-12-01T10:20:30", "2026-13-01T10:20:30Z",
                "2026-02-30T10:20:30Z", "2026-12-01T24:00:00Z", "2026-12-01T10:60:00Z",
                "2026-12-01T10:20:61Z", "2026-12-01T10:20:30+24:00", "2026-12-01T10:20:30.Z",
                "2026-12-01T10:20:30Z\n", "\uff12\uff10\uff12\uff16-12-01T10:20:30Z",
                "0000-01-01T00:00:00Z"):
        with pytest.raises(Unprocessable):
            intake.parse_created_at(bad, now)


async def test_created_at_forms_over_http(make_api: MakeApi) -> None:
    api = await make_api()
    moment = time.strftime("%Y-%m-%dt%H:%M:%Sz", time.gmtime(time.time() - 60))
    response = await api.client.post("/v1/events", json=event(api, created_at=moment),
                                     headers=api.service)
    assert response.status == 202, await response.text()
    week = time.strftime("%G-W%V-%uT%H:%M:%SZ", time.gmtime())
    response = await api.client.post("/v1/events", json=event(
        api, event_id=f"{api.prefix}-w", created_at=week), headers=api.service)
    assert (await error_of(response, 422))["field"] == "created_at"


async def test_empty_user_id_with_a_user_token_is_400(make_api: MakeApi) -> None:
    api = await make_api()
    user = api.user("u")
    for headers in (api.token(user), api.service):
        response = await api.client.get("/v1/inbox?user_id=", headers=headers)
        assert (await error_of(response, 400))["field"] == "user_id"


async def test_self_unfollow_is_an_idempotent_204(make_api: MakeApi) -> None:
    api = await make_api()
    user = api.user("u")
    response = await api.client.delete(f"/v1/users/{user}/following/{user}",
                                       headers=api.service)
    assert response.status == 204
    response = await api.client.put(f"/v1/users/{user}/following/{user}", headers=api.service)
    assert (await error_of(response, 422))["code"] == "self_follow"


# --- user tokens --------------------------------------------------------------------------


def claims_token(**claims: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {jwt.encode(claims, JWT_SECRET, algorithm='HS256')}"}


async def test_token_rules(make_api: MakeApi) -> None:
    api = await make_api(jwt_max_ttl=3600.0)
    user = api.user("u")
    now = int(time.time())
    refused = [
        claims_token(sub=user, iat=now, exp=str(now + 60)),  # numeric string exp
        claims_token(sub=user, iat=str(now), exp=now + 60),
        claims_token(sub=user, iat=now, exp=now + 60.5),
        claims_token(sub=user, exp=now + 60),  # no iat
        claims_token(sub=user, iat=now, exp=now + 3601),  # longer than the max lifetime
        claims_token(sub="", iat=now, exp=now + 60),
        claims_token(sub="a b", iat=now, exp=now + 60),
        claims_token(sub=user, iat=now, exp=now + 60, nbf="0"),
        claims_token(sub=user, iat=now, exp=True),
        {"Authorization": "Bearer " + jwt.encode({"sub": user, "iat": now, "exp": now + 60},
                                                 JWT_SECRET + "x" * 32, algorithm="HS512")},
    ]
    for headers in refused:
        response = await api.client.get("/v1/inbox", headers=headers)
        await error_of(response, 401)
    accepted = claims_token(sub=user, iat=now, exp=now + 3600)
    assert (await api.client.get("/v1/inbox", headers=accepted)).status == 200
    assert (await api.client.get("/v1/inbox", headers={
        "Authorization": f"Bearer {issue_token(JWT_SECRET, user, 600)}"})).status == 200


def test_short_jwt_secret_stops_the_process_at_start() -> None:
    with pytest.raises(ConfigError, match="FEEDSVC_JWT_SECRET"):
        Settings.load({"FEEDSVC_JWT_SECRET": "x" * 31})
    assert Settings.load({"FEEDSVC_JWT_SECRET": "x" * 32}).jwt_secret == "x" * 32
    with pytest.raises(ConfigError, match="FEEDSVC_JWT_MAX_TTL"):
        Settings.load({"FEEDSVC_JWT_MAX_TTL": "0"})
    assert Settings.load({"FEEDSVC_JWT_MAX_TTL": "1d"}).jwt_max_ttl == 86_400
    with pytest.raises(ConfigError, match="FEEDSVC_SERVICE_KEYS"):
        Settings.load({"FEEDSVC_SERVICE_KEYS": "good,bad key\u00e9"})


def test_migrate_against_a_down_node_prints_one_line() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEEDSVC_")}
    env.update(FEEDSVC_CASSANDRA_HOSTS=f"127.0.0.1:{port}", FEEDSVC_REDIS_URL="redis://x:1")
    done = subprocess.run([str(Path(sys.executable).with_name("feedsvc")), "migrate"], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0], done.stderr
    assert "FEEDSVC_CASSANDRA_HOSTS" in lines[0]
