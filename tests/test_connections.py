"""Slow and idle clients against the production runner (``feedsvc.api.server``): header,
body and keep-alive timeouts close what they should, the connection cap keeps ``/healthz``
answering past 1,000 idle sockets, and none of it logs a traceback. Connection handling does
not depend on the backend, so these run on the embedded one."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from feedsvc.api.app import init_app
from feedsvc.api.server import Limits
from feedsvc.runtime import Runtime
from tests.apiclient import Api
from tests.conftest import GuardedTestServer, MakeApi

pytestmark = pytest.mark.parametrize("make_runtime", ["embedded"], indirect=True)


async def connect(api: Api) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    server = api.client.server
    return await asyncio.open_connection(server.host, server.port)


async def closed_by_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           drip: bytes, within: float) -> tuple[bool, bytes]:
    """Send ``drip`` one byte a second; True (and what the server sent) if the server closed
    the connection before ``within`` seconds."""
    deadline = time.monotonic() + within
    received = b""
    for byte in drip:
        try:
            writer.write(bytes([byte]))
            await writer.drain()
        except ConnectionError:
            return True, received
        try:
            chunk = await asyncio.wait_for(reader.read(65_536), timeout=1.0)
        except TimeoutError:
            chunk = None
        if chunk == b"":
            return True, received
        received += chunk or b""
        if time.monotonic() > deadline:
            return False, received
    return False, received


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    loud = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not loud, [r.getMessage() for r in loud]


async def test_headers_sent_one_byte_a_second_are_cut_off(
    make_api: MakeApi, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="feedsvc")
    api = await make_api(header_timeout=2.0)
    reader, writer = await connect(api)
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"y" * 100 + b"\r\n\r\n"
    closed, received = await closed_by_server(reader, writer, request, within=8.0)
    writer.close()
    assert closed and received == b""
    assert any("FEEDSVC_HEADER_TIMEOUT" in r.getMessage() for r in caplog.records)
    no_tracebacks(caplog)


async def test_a_body_sent_one_byte_a_second_is_408(
    make_api: MakeApi, caplog: pytest.LogCaptureFixture,
) -> None:
    api = await make_api(body_timeout=2.0)
    reader, writer = await connect(api)
    writer.write(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + api.service["Authorization"][7:].encode() +
                 b"\r\nContent-Length: 200\r\n\r\n")
    closed, received = await closed_by_server(reader, writer, b"{" * 200, within=10.0)
    writer.close()
    assert closed
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    assert json.loads(body)["error"]["code"] == "request_timeout"
    no_tracebacks(caplog)


async def test_an_idle_keep_alive_connection_is_closed(make_api: MakeApi) -> None:
    api = await make_api(keepalive_timeout=1.0)
    reader, writer = await connect(api)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    await reader.readexactly(int(head.lower().split(b"content-length: ")[1].split(b"\r")[0]))
    # Nothing more is sent: the server ends the connection after the keep-alive timeout.
    assert await asyncio.wait_for(reader.read(), timeout=10.0) == b""
    writer.close()


async def test_a_thousand_idle_sockets_do_not_stop_healthz(
    make_api: MakeApi, caplog: pytest.LogCaptureFixture,
) -> None:
    api = await make_api(max_connections=200, header_timeout=60.0)
    sockets = [await connect(api) for _ in range(1_000)]
    # Half of them start a request and stall in its headers.
    for _, writer in sockets[::2]:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: ")
    await asyncio.sleep(0.2)
    for _ in range(3):
        response = await api.client.get("/healthz")
        assert response.status == 200
        assert await response.json() == {"status": "ok"}

    async def server_closed(reader: asyncio.StreamReader) -> bool:
        try:
            return await asyncio.wait_for(reader.read(), timeout=0.01) == b""
        except TimeoutError:
            return False

    closed = sum([await server_closed(reader) for reader, _ in sockets])
    assert closed >= 800  # the oldest idle ones made room: at most the cap stay open
    for _, writer in sockets:
        writer.close()
    await asyncio.gather(*(w.wait_closed() for _, w in sockets), return_exceptions=True)
    await asyncio.sleep(0.2)
    no_tracebacks(caplog)


async def test_aborted_uploads_and_garbage_log_no_traceback(
    make_api: MakeApi, caplog: pytest.LogCaptureFixture,
) -> None:
    api = await make_api()
    for request in (
        b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: " + api.service["Authorization"].encode() +
        b"\r\nContent-Length: 500\r\n\r\n{\"event_id\":",  # then the socket is closed
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS hello on the HTTP port
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ):
        reader, writer = await connect(api)
        writer.write(request)
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()
        await writer.wait_closed()
    reader, writer = await connect(api)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
    head, _, body = (await reader.read()).partition(b"\r\n\r\n")
    writer.close()
    assert head.split()[1] == b"400" and b"application/json" in head
    assert json.loads(body)["error"]["code"] == "invalid_request"
    await asyncio.sleep(0.2)
    assert (await api.client.get("/healthz")).status == 200
    no_tracebacks(caplog)


async def test_an_unexpected_error_is_a_json_500_logged_once_with_its_id(
    runtime: Runtime, caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken(request: web.Request) -> web.Response:
        raise KeyError("a bug")

    app = init_app(runtime)
    app.router.add_get("/broken", broken)
    client: TestClient[Any, Any] = TestClient(GuardedTestServer(app, Limits()))
    await client.start_server()
    try:
        response = await client.get("/broken")
        assert response.status == 500
        error = (await response.json())["error"]
        error_id = response.headers["Error-Id"]
        assert error == {"code": "internal_error", "field": None, "message": error["message"]}
        assert error_id in error["message"]
    finally:
        await client.close()
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(logged) == 1 and error_id in logged[0].getMessage() and logged[0].exc_info
