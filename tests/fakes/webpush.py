"""Fake Web Push service: decrypts every message, proving the RFC 8291 encryption.

``subscribe()`` makes a browser-side subscription (a P-256 key pair and an auth secret) and
returns the endpoint and public keys a browser would hand over. ``POST /push/{id}`` checks
the RFC 8292 VAPID header (``vapid t=<JWT>, k=<public key>``: ES256 signature by ``k``,
``aud`` = this origin, ``exp`` within 24 hours, a mailto:/https: ``sub``; ``k`` must be the
expected application server key when one is set), ``Content-Encoding: aes128gcm``, ``TTL``
and ``Urgency``, then decrypts the body with the subscription's private key and records the
plaintext. Answers: 201 with ``Location``; 410 for dead subscriptions, 404 for unknown ones;
429/503 with Retry-After.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from dataclasses import dataclass

import http_ece
import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.fakes.ledger import Behaviour, pause, retry_headers
from tests.fakes.web import HttpFake


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def public_raw(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> bytes:
    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    return public.public_bytes(serialization.Encoding.X962,
                               serialization.PublicFormat.UncompressedPoint)


def new_vapid_key() -> tuple[str, str]:
    """(raw private key, raw public key), base64url: FEEDSVC_VAPID_PRIVATE_KEY and the
    applicationServerKey a browser subscribes with."""
    key = ec.generate_private_key(ec.SECP256R1())
    return b64url(key.private_numbers().private_value.to_bytes(32, "big")), b64url(public_raw(key))


@dataclass
class Subscription:
    sub_id: str
    key: ec.EllipticCurvePrivateKey
    auth: bytes
    endpoint: str

    @property
    def p256dh(self) -> str:
        return b64url(public_raw(self.key))

    @property
    def auth_b64(self) -> str:
        return b64url(self.auth)


class FakeWebPush(HttpFake):
    def __init__(self, behaviour: Behaviour | None = None,
                 application_server_key: str | None = None) -> None:
        super().__init__(behaviour)
        self.application_server_key = application_server_key
        self.subscriptions: dict[str, Subscription] = {}
        self.bad_vapid = 0
        self.headers_seen: list[dict[str, str]] = []

    def subscribe(self) -> Subscription:
        sub_id = secrets.token_hex(8)
        sub = Subscription(sub_id, ec.generate_private_key(ec.SECP256R1()),
                           secrets.token_bytes(16), f"{self.url}/push/{sub_id}")
        self.subscriptions[sub_id] = sub
        return sub

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/push/{sub_id}", self.push)

    def _vapid_problem(self, header: str) -> str | None:
        scheme, _, params = header.partition(" ")
        if scheme.lower() != "vapid":
            return "not a vapid Authorization header"
        parts = dict(p.strip().split("=", 1) for p in params.split(",") if "=" in p)
        if "t" not in parts or "k" not in parts:
            return "vapid header lacks t or k"
        if self.application_server_key and parts["k"] != self.application_server_key:
            return "k is not the subscription's application server key"
        try:
            public = ec.EllipticCurvePublicKey.from_encoded_point(
                ec.SECP256R1(), b64url_decode(parts["k"]))
            claims = jwt.decode(parts["t"], public, algorithms=["ES256"], audience=self.url,
                                options={"require": ["aud", "exp", "sub"]})
        except (ValueError, jwt.InvalidTokenError) as exc:
            return f"vapid token invalid: {exc}"
        if int(claims["exp"]) > time.time() + 24 * 3600:
            return "vapid exp more than 24 hours ahead"
        if not str(claims["sub"]).startswith(("mailto:", "https:")):
            return "vapid sub is not mailto: or https:"
        return None

    async def push(self, request: web.Request) -> web.Response:
        problem = self._vapid_problem(request.headers.get("Authorization", ""))
        if problem:
            self.bad_vapid += 1
            return web.Response(status=401, text=problem)
        if request.headers.get("Content-Encoding") != "aes128gcm":
            return web.Response(status=415, text="Content-Encoding must be aes128gcm")
        if not request.headers.get("TTL", "").isdigit():
            return web.Response(status=400, text="TTL header required")
        if request.headers.get("Urgency", "normal") not in ("very-low", "low", "normal", "high"):
            return web.Response(status=400, text="bad Urgency")
        self.headers_seen.append(dict(request.headers))
        sub_id = request.match_info["sub_id"]
        body = await request.read()
        decision = self.ledger.decide(self.behaviour, request.headers.get("Idempotency-Key"),
                                      sub_id)
        await pause(self.behaviour, decision)
        if decision.outcome == "missing_key":
            return web.Response(status=400, text="Idempotency-Key missing")
        if decision.outcome == "duplicate":
            return web.Response(status=201, headers={"Location": decision.message_id})
        if decision.outcome in ("scripted", "error", "hang"):
            return web.Response(status=decision.status, text="injected failure",
                                headers=retry_headers(self.behaviour, decision.status))
        if decision.outcome == "dead":
            return web.Response(status=410, text="push subscription has unsubscribed or expired")
        sub = self.subscriptions.get(sub_id)
        if sub is None:
            return web.Response(status=404, text="no such subscription")
        try:
            plain = http_ece.decrypt(body, private_key=sub.key, auth_secret=sub.auth,
                                     version="aes128gcm")
            message = json.loads(plain)
        except (http_ece.ECEException, ValueError) as exc:
            return web.Response(status=400, text=f"cannot decrypt: {exc}")
        key = request.headers["Idempotency-Key"]
        message_id = self.ledger.accept(key, {"subscription": sub_id, "message": message,
                                              "ttl": request.headers["TTL"],
                                              "urgency": request.headers.get("Urgency")})
        location = f"{self.url}/message/{message_id}"
        self.ledger.message_ids[key] = location
        return web.Response(status=201, headers={"Location": location})
