"""APNs over HTTP/2: ``POST {url}/3/device/{token}`` with an ES256 provider token.

A channel worker calls ``ApnsProvider.send`` for a push delivery to an ``apns`` device. The
provider token (a JWT signed with the team's .p8 key) is reused for ``TOKEN_REUSE`` seconds:
Apple refuses tokens older than an hour and throttles renewals more often than every 20
minutes. ``apns-id`` is a UUID derived from the delivery key, so a repeated call names the
same notification; ``apns-priority`` is 10 (send now) for high and medium events, 5 (may be
delayed for power) for low ones.

Answers: 200 sent; 410 ``Unregistered`` and 400 ``BadDeviceToken`` /
``DeviceTokenNotForTopic`` dead token; 403 ``ExpiredProviderToken`` /
``InvalidProviderToken`` renews the token and retries later; 429 / 5xx retry; any other
4xx rejected.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jwt

from feedsvc.delivery.providers import http
from feedsvc.delivery.providers.base import IDEMPOTENCY_HEADER, Outgoing, Receipt, key_uuid
from feedsvc.errors import ConfigError, DeadTarget, ProviderRejected, ProviderUnavailable

log = logging.getLogger(__name__)

# Seconds a provider token is reused: inside Apple's 20-60 minute window.
TOKEN_REUSE = 40 * 60
PRIORITY = {"high": "10", "medium": "10", "low": "5"}
DEAD_REASONS = {"Unregistered": "unregistered", "BadDeviceToken": "bad_device_token",
                "DeviceTokenNotForTopic": "token_not_for_topic"}
TOKEN_REASONS = {"ExpiredProviderToken", "InvalidProviderToken"}


def read_key(path: Path) -> str:
    """The PEM text of a .p8 signing key; ConfigError when it is not one."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"FEEDSVC_APNS_KEY_FILE={str(path)!r} cannot be read: {exc}") from exc
    if "PRIVATE KEY" not in text:
        raise ConfigError(f"FEEDSVC_APNS_KEY_FILE={str(path)!r} is not a PEM (.p8) key")
    return text


class ProviderTokens:
    """The ES256 provider token, signed once and reused for TOKEN_REUSE seconds."""

    def __init__(self, key_pem: str, key_id: str, team_id: str) -> None:
        self.key_pem, self.key_id, self.team_id = key_pem, key_id, team_id
        self.token: str | None = None
        self.issued_at = 0.0
        self.signed = 0

    def get(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        if self.token is None or now - self.issued_at >= TOKEN_REUSE:
            self.token = jwt.encode({"iss": self.team_id, "iat": int(now)}, self.key_pem,
                                    algorithm="ES256", headers={"kid": self.key_id})
            self.issued_at = now
            self.signed += 1
        return self.token

    def invalidate(self, token: str) -> None:
        if self.token == token:
            self.token = None


class ApnsProvider:
    """Sends alert notifications to APNs device tokens."""

    name = "apns"

    def __init__(self, key_pem: str, key_id: str, team_id: str, topic: str,
                 base_url: str = "https://api.push.apple.com", *, timeout: float = 10.0,
                 client: http.HttpClient | None = None) -> None:
        self.tokens = ProviderTokens(key_pem, key_id, team_id)
        self.topic = topic
        self.base_url = base_url.rstrip("/")
        # Its own HTTP/2-only client (prior knowledge on http://); closed by aclose.
        self._owns_client = client is None
        self.client = client or http.open_http2_client(timeout)

    async def send(self, message: Outgoing) -> Receipt:
        token = self.tokens.get()
        apns_id = str(key_uuid(message.key))
        headers = {
            "authorization": f"bearer {token}",
            "apns-topic": self.topic,
            "apns-push-type": "alert",
            "apns-priority": PRIORITY[message.priority],
            "apns-id": apns_id,
            IDEMPOTENCY_HEADER: message.key,
        }
        payload: dict[str, Any] = {k: v for k, v in message.data.items() if k != "aps"}
        payload["aps"] = {"alert": {"title": message.title, "body": message.body}}
        url = f"{self.base_url}/3/device/{quote(message.address, safe='')}"
        answer = await self.client.request(self.name, "POST", url, headers=headers,
                                           json_body=payload)
        status = answer.status
        if status == 200:
            return Receipt(self.name, answer.headers.get("apns-id", apns_id))
        reason = str(answer.json().get("reason", ""))
        if status == 410 or reason in DEAD_REASONS:
            raise DeadTarget(self.name, DEAD_REASONS.get(reason, "unregistered"), reason,
                             status=status)
        if status == 403 and reason in TOKEN_REASONS:
            self.tokens.invalidate(token)
            raise ProviderUnavailable(self.name, f"HTTP 403 {reason}; renewing the token",
                                      status=status)
        if http.is_transient(status):
            raise http.unavailable(self.name, answer, reason)
        raise ProviderRejected(self.name, f"HTTP {status} {reason}".strip(), status=status)

    async def aclose(self) -> None:
        if self._owns_client:
            await self.client.aclose()
