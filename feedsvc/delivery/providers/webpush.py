"""Web Push: an RFC 8291 ``aes128gcm`` body POSTed to the subscription's endpoint, signed
with RFC 8292 VAPID.

A channel worker calls ``WebPushProvider.send`` for a push delivery to a ``webpush`` device.
The payload (JSON ``{"title", "body", "data"}``) is encrypted for the browser with a fresh
ephemeral key and salt per message (http_ece); the push service sees only ciphertext. The
VAPID JWT (py_vapid, ES256) is cached per push-service origin for ``VAPID_REUSE`` seconds.
``TTL`` is how long the push service may hold the message; ``Urgency`` follows the event's
priority.

Answers: 201/200/202 sent (``Location`` is the message id); 404 and 410 dead subscription;
429 / 5xx retry; any other 4xx rejected (413: payload too large).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time
from urllib.parse import urlsplit

import http_ece
from cryptography.hazmat.primitives.asymmetric import ec
from py_vapid import Vapid02

from feedsvc.delivery.providers import http
from feedsvc.delivery.providers.base import IDEMPOTENCY_HEADER, Outgoing, Receipt
from feedsvc.errors import ConfigError, DeadTarget, ProviderRejected

log = logging.getLogger(__name__)

TTL_SECONDS = 24 * 3600  # a push service drops the message after this long undelivered
URGENCY = {"high": "high", "medium": "normal", "low": "low"}
VAPID_LIFETIME = 12 * 3600  # exp of a VAPID JWT (RFC 8292 allows at most 24 hours)
VAPID_REUSE = 6 * 3600  # a cached VAPID header is re-signed after this long


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def load_vapid(private_key: str, subject: str) -> Vapid02:
    """The VAPID signer from FEEDSVC_VAPID_PRIVATE_KEY; ConfigError when it is not a key."""
    if not subject.startswith(("mailto:", "https:")):
        raise ConfigError(f"FEEDSVC_VAPID_SUBJECT={subject!r} must be a mailto: or https: URI")
    try:
        raw = b64url_decode(private_key)
        if len(raw) != 32:
            raise ValueError(f"{len(raw)} bytes, not 32")
        vapid = Vapid02.from_raw(private_key.encode())
    except ValueError as exc:
        raise ConfigError(
            f"FEEDSVC_VAPID_PRIVATE_KEY is not a raw P-256 private key in base64url: {exc}"
        ) from exc
    # The subject is checked above; py_vapid's own check refuses https: URIs with a path,
    # which RFC 8292 allows.
    vapid.conf = {"no-strict": True}
    return vapid


def encrypt(payload: bytes, p256dh: str, auth: str) -> bytes:
    """The ``aes128gcm`` body for one subscription (RFC 8291): a fresh ephemeral key and
    salt per call; the header carries the ephemeral public key as its key id."""
    ephemeral = ec.generate_private_key(ec.SECP256R1())
    body: bytes = http_ece.encrypt(
        payload, salt=os.urandom(16), private_key=ephemeral, dh=b64url_decode(p256dh),
        auth_secret=b64url_decode(auth), version="aes128gcm")
    return body


class WebPushProvider:
    """Sends encrypted push messages to browser subscriptions."""

    name = "webpush"

    def __init__(self, vapid: Vapid02, subject: str, client: http.HttpClient) -> None:
        self.vapid = vapid
        self.subject = subject
        self.client = client
        self._headers: dict[str, tuple[float, str]] = {}  # origin -> (signed at, header)

    def authorization(self, endpoint: str, now: float | None = None) -> str:
        """The VAPID ``Authorization`` header for the endpoint's origin (cached)."""
        now = time.time() if now is None else now
        parts = urlsplit(endpoint)
        origin = f"{parts.scheme}://{parts.netloc}"
        cached = self._headers.get(origin)
        if cached is not None and now - cached[0] < VAPID_REUSE:
            return cached[1]
        claims = {"aud": origin, "sub": self.subject, "exp": int(now) + VAPID_LIFETIME}
        header = str(self.vapid.sign(claims)["Authorization"])
        self._headers[origin] = (now, header)
        return header

    async def send(self, message: Outgoing) -> Receipt:
        if message.webpush is None:
            raise ProviderRejected(self.name, "subscription keys missing")
        if urlsplit(message.address).scheme not in ("https", "http"):
            raise DeadTarget(self.name, "invalid_subscription", "endpoint is not an http(s) URL")
        plain = json.dumps({"title": message.title, "body": message.body,
                            "data": message.data}, separators=(",", ":")).encode()
        try:
            body = encrypt(plain, message.webpush.p256dh, message.webpush.auth)
        except (ValueError, http_ece.ECEException) as exc:
            # Keys the browser never made: this subscription cannot receive.
            raise DeadTarget(self.name, "invalid_subscription", str(exc)) from exc
        headers = {
            "Authorization": self.authorization(message.address),
            "Content-Encoding": "aes128gcm",
            "Content-Type": "application/octet-stream",
            "TTL": str(TTL_SECONDS),
            "Urgency": URGENCY[message.priority],
            IDEMPOTENCY_HEADER: message.key,
        }
        answer = await self.client.request(self.name, "POST", message.address,
                                           headers=headers, content=body)
        status = answer.status
        if status in (200, 201, 202):
            return Receipt(self.name, answer.headers.get("location", ""))
        if status in (404, 410):
            reason = "subscription_gone" if status == 410 else "subscription_not_found"
            raise DeadTarget(self.name, reason, f"HTTP {status}", status=status)
        if http.is_transient(status):
            raise http.unavailable(self.name, answer)
        raise ProviderRejected(self.name, f"HTTP {status} {answer.text[:200]}".strip(),
                               status=status)

    async def aclose(self) -> None:
        """Nothing of its own: the HTTP client is shared and closed by its owner."""
