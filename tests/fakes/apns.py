"""Fake APNs: HTTP/2 with prior knowledge (h2), ``POST /3/device/{token}``.

Checks the ES256 provider token (signature by the team's key, ``kid`` = key id, ``iss`` =
team id, ``iat`` within the hour), ``apns-topic``, ``apns-push-type``, ``apns-priority`` and
the ``aps.alert`` payload, and answers as APNs does: 200 with ``apns-id``, 410
``Unregistered`` for dead tokens, 400 ``BadDeviceToken`` for malformed ones, 403
``InvalidProviderToken``, 429 ``TooManyRequests`` / 503 ``ServiceUnavailable`` with
Retry-After. ``provider_tokens`` holds every distinct provider token seen.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.fakes.ledger import Behaviour, Ledger, pause, retry_headers

KEY_ID = "FAKEKEY123"
TEAM_ID = "FAKETEAM42"
TOPIC = "org.feedsvc.test"
REASONS = {400: "BadMessageId", 403: "Forbidden", 404: "BadPath", 410: "Unregistered",
           413: "PayloadTooLarge", 429: "TooManyRequests", 500: "InternalServerError",
           503: "ServiceUnavailable"}

Answer = tuple[int, dict[str, str], dict[str, Any] | None]


class FakeApns:
    def __init__(self, behaviour: Behaviour | None = None, *, topic: str = TOPIC) -> None:
        self.behaviour = behaviour or Behaviour()
        self.ledger = Ledger()
        self.topic = topic
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.bad_tokens: set[str] = set()  # answered 400 BadDeviceToken
        self.provider_tokens: set[str] = set()
        self.connections = 0
        self.url = ""

    def key_pem(self) -> str:
        return self.key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()).decode()

    def write_key(self, path: Path) -> Path:
        path.write_text(self.key_pem())
        return path

    @asynccontextmanager
    async def running(self, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[FakeApns]:
        tasks: set[asyncio.Task[None]] = set()

        async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            tasks.add(task)
            try:
                await self._serve(reader, writer)
            finally:
                tasks.discard(task)
                writer.close()

        server = await asyncio.start_server(connected, host, port)
        self.url = f"http://{host}:{server.sockets[0].getsockname()[1]}"
        try:
            yield self
        finally:
            server.close()
            for task in list(tasks):
                task.cancel()
            for task in list(tasks):
                with suppress(asyncio.CancelledError):
                    await task
            await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        streams: dict[int, tuple[dict[str, str], bytearray]] = {}
        handlers: set[asyncio.Task[None]] = set()
        lock = asyncio.Lock()

        async def respond(stream_id: int, headers: dict[str, str], body: bytes) -> None:
            status, extra, payload = await self._answer(headers, body)
            data = json.dumps(payload).encode() if payload is not None else b""
            out = [(":status", str(status)), *extra.items()]
            if data:
                out += [("content-type", "application/json"),
                        ("content-length", str(len(data)))]
            async with lock:
                with suppress(h2.exceptions.StreamClosedError):
                    conn.send_headers(stream_id, out, end_stream=not data)
                    if data:
                        conn.send_data(stream_id, data, end_stream=True)
                writer.write(conn.data_to_send())
                await writer.drain()

        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    return
                for event in conn.receive_data(chunk):
                    if isinstance(event, h2.events.RequestReceived):
                        headers = {k.decode() if isinstance(k, bytes) else k:
                                   v.decode() if isinstance(v, bytes) else v
                                   for k, v in event.headers}
                        streams[event.stream_id] = (headers, bytearray())
                    elif isinstance(event, h2.events.DataReceived):
                        streams[event.stream_id][1].extend(event.data)
                        conn.acknowledge_received_data(event.flow_controlled_length,
                                                       event.stream_id)
                    elif isinstance(event, h2.events.StreamEnded):
                        headers, body = streams.pop(event.stream_id)
                        task = asyncio.create_task(respond(event.stream_id, headers,
                                                           bytes(body)))
                        handlers.add(task)
                        task.add_done_callback(handlers.discard)
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        return
                async with lock:
                    writer.write(conn.data_to_send())
                    await writer.drain()
        except (ConnectionError, h2.exceptions.ProtocolError):
            return
        finally:
            for task in list(handlers):
                task.cancel()

    def _check_token(self, header: str) -> str | None:
        """None when the provider token is good, else the APNs reason."""
        if not header.startswith("bearer "):
            return "MissingProviderToken"
        token = header.removeprefix("bearer ")
        try:
            head = jwt.get_unverified_header(token)
            claims = jwt.decode(token, self.key.public_key(), algorithms=["ES256"],
                                issuer=TEAM_ID, options={"require": ["iss", "iat"]})
        except jwt.InvalidTokenError:
            return "InvalidProviderToken"
        if head.get("kid") != KEY_ID:
            return "InvalidProviderToken"
        if time.time() - int(claims["iat"]) > 3600:
            return "ExpiredProviderToken"
        self.provider_tokens.add(token)
        return None

    async def _answer(self, headers: dict[str, str], body: bytes) -> Answer:
        path = headers.get(":path", "")
        if headers.get(":method") == "GET" and path.startswith("/_fake/stats"):
            return 200, {}, self.ledger.stats(keys=path.endswith("keys=1"))
        if headers.get(":method") != "POST" or not path.startswith("/3/device/"):
            return 405 if headers.get(":method") != "POST" else 404, {}, {"reason": "BadPath"}
        token = path.removeprefix("/3/device/")
        problem = self._check_token(headers.get("authorization", ""))
        if problem:
            return 403, {}, {"reason": problem}
        if headers.get("apns-topic") != self.topic:
            return 400, {}, {"reason": "DeviceTokenNotForTopic" if headers.get("apns-topic")
                             else "MissingTopic"}
        if headers.get("apns-push-type") not in ("alert", "background"):
            return 400, {}, {"reason": "InvalidPushType"}
        if headers.get("apns-priority") not in ("10", "5", "1"):
            return 400, {}, {"reason": "BadPriority"}
        try:
            payload = json.loads(body)
            alert = payload["aps"]["alert"]
        except (ValueError, KeyError, TypeError):
            return 400, {}, {"reason": "PayloadEmpty" if not body else "BadRequest"}
        decision = self.ledger.decide(self.behaviour, headers.get("idempotency-key"), token)
        await pause(self.behaviour, decision)
        if decision.outcome == "missing_key":
            return 400, {}, {"reason": "BadRequest"}
        if decision.outcome == "duplicate":
            return 200, {"apns-id": decision.message_id}, None
        if decision.outcome in ("scripted", "error", "hang"):
            status = decision.status
            return (status, retry_headers(self.behaviour, status),
                    {"reason": REASONS.get(status, "BadRequest")})
        if decision.outcome == "dead":
            return 410, {}, {"reason": "Unregistered", "timestamp": int(time.time() * 1000)}
        if token in self.bad_tokens:
            return 400, {}, {"reason": "BadDeviceToken"}
        apns_id = headers.get("apns-id", "")
        key = headers["idempotency-key"]
        self.ledger.accept(key, {"token": token, "alert": alert, "payload": payload,
                                 "apns-id": apns_id,
                                 "apns-priority": headers.get("apns-priority")})
        self.ledger.message_ids[key] = apns_id
        return 200, {"apns-id": apns_id}, None
