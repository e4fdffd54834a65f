"""FCM HTTP v1: ``POST {url}/v1/projects/{project}/messages:send`` with an OAuth2 token.

A channel worker calls ``FcmProvider.send`` for a push delivery to an ``fcm`` device. The
access token comes from the service account's ``token_uri`` by the JWT-bearer grant (an
RS256 assertion signed with the account's private key, RFC 7523) and is cached until shortly
before it expires; concurrent sends share one fetch. The grant is one form POST on the
shared HTTP client: google-auth's refresh is synchronous and would block the event loop.

Answers: 200 ``{"name"}`` sent; 404 / ``UNREGISTERED`` and 400 ``INVALID_ARGUMENT`` naming
``message.token`` dead token; 401 drops the cached token and retries later; 429 / 5xx
retry (Retry-After); any other 4xx rejected.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import jwt

from feedsvc.delivery.providers import http
from feedsvc.delivery.providers.base import IDEMPOTENCY_HEADER, Outgoing, Receipt
from feedsvc.errors import ConfigError, DeadTarget, ProviderRejected, ProviderUnavailable

log = logging.getLogger(__name__)

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ASSERTION_LIFETIME = 3600  # seconds; Google's maximum
# A cached access token is renewed this long before its expiry, so no send carries a token
# that expires in flight.
REFRESH_MARGIN = 120.0


class ServiceAccount:
    """The fields of a service-account JSON file that the grant needs."""

    def __init__(self, client_email: str, private_key: str, token_uri: str,
                 private_key_id: str | None = None, project_id: str | None = None) -> None:
        self.client_email = client_email
        self.private_key = private_key
        self.token_uri = token_uri
        self.private_key_id = private_key_id
        self.project_id = project_id

    @classmethod
    def from_file(cls, path: Path) -> ServiceAccount:
        try:
            info: Any = json.loads(path.read_text())
            return cls(info["client_email"], info["private_key"], info["token_uri"],
                       info.get("private_key_id"), info.get("project_id"))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"FEEDSVC_FCM_CREDENTIALS={str(path)!r} is not a readable service-account JSON "
                f"file with client_email, private_key and token_uri ({exc!r})") from exc


class AccessTokens:
    """OAuth2 access tokens for one service account, fetched once and cached until expiry."""

    def __init__(self, account: ServiceAccount, client: http.HttpClient) -> None:
        self.account = account
        self.client = client
        self.token: str | None = None
        self.expires_at = 0.0  # time.monotonic()
        self.fetches = 0
        self._lock = asyncio.Lock()

    def assertion(self, now: float) -> str:
        claims = {"iss": self.account.client_email, "scope": SCOPE,
                  "aud": self.account.token_uri, "iat": int(now),
                  "exp": int(now) + ASSERTION_LIFETIME}
        headers = {"kid": self.account.private_key_id} if self.account.private_key_id else None
        return jwt.encode(claims, self.account.private_key, algorithm="RS256", headers=headers)

    async def get(self) -> str:
        if self.token is not None and time.monotonic() < self.expires_at:
            return self.token
        async with self._lock:  # one fetch for every send waiting on it
            if self.token is not None and time.monotonic() < self.expires_at:
                return self.token
            return await self._fetch()

    def invalidate(self, token: str) -> None:
        if self.token == token:
            self.token = None

    async def _fetch(self) -> str:
        started = time.monotonic()
        form = {"grant_type": GRANT_TYPE, "assertion": self.assertion(time.time())}
        answer = await self.client.request("fcm", "POST", self.account.token_uri, headers={},
                                           form=form)
        self.fetches += 1
        if http.is_transient(answer.status):
            raise http.unavailable("fcm", answer, "from the OAuth token endpoint")
        body = answer.json()
        if answer.status != 200 or not isinstance(body.get("access_token"), str):
            raise ProviderRejected(
                "fcm", f"OAuth token refused: HTTP {answer.status} "
                f"{body.get('error', '')} {body.get('error_description', '')}".strip(),
                status=answer.status)
        lifetime = float(body.get("expires_in", 3600))
        self.token = str(body["access_token"])
        self.expires_at = started + max(lifetime - REFRESH_MARGIN, lifetime / 2)
        log.debug("fcm access token fetched, valid %.0fs", lifetime)
        return self.token


class FcmProvider:
    """Sends push messages to FCM device tokens."""

    name = "fcm"

    def __init__(self, project_id: str, account: ServiceAccount, client: http.HttpClient,
                 base_url: str = "https://fcm.googleapis.com") -> None:
        self.client = client
        self.tokens = AccessTokens(account, client)
        self.url = f"{base_url.rstrip('/')}/v1/projects/{project_id}/messages:send"

    async def send(self, message: Outgoing) -> Receipt:
        token = await self.tokens.get()
        body = {"message": {
            "token": message.address,
            "notification": {"title": message.title, "body": message.body},
            "data": message.data,
        }}
        headers = {"Authorization": f"Bearer {token}", IDEMPOTENCY_HEADER: message.key}
        answer = await self.client.request(self.name, "POST", self.url, headers=headers,
                                           json_body=body)
        status = answer.status
        if status == 200:
            return Receipt(self.name, str(answer.json().get("name", "")))
        if status == 401:
            self.tokens.invalidate(token)
            raise ProviderUnavailable(self.name, "HTTP 401: access token refused; renewing",
                                      status=status)
        if http.is_transient(status):
            raise http.unavailable(self.name, answer, _error_text(answer))
        raise _permanent(answer)

    async def aclose(self) -> None:
        """Nothing of its own: the HTTP client is shared and closed by its owner."""


def _error_text(answer: http.Answer) -> str:
    error = answer.json().get("error")
    if isinstance(error, dict):
        return f"{error.get('status', '')} {error.get('message', '')}".strip()
    return ""


def _permanent(answer: http.Answer) -> DeadTarget | ProviderRejected:
    """Sort a final 4xx answer: a dead token, or a message FCM will never take."""
    error = answer.json().get("error")
    error = error if isinstance(error, dict) else {}
    status = answer.status
    details = [d for d in error.get("details", []) if isinstance(d, dict)]
    codes = {d.get("errorCode") for d in details} | {error.get("status")}
    names_token = any(
        isinstance(v, dict) and v.get("field") == "message.token"
        for d in details for v in d.get("fieldViolations", []) or []
    )
    text = _error_text(answer)
    if status == 404 or "UNREGISTERED" in codes:
        return DeadTarget("fcm", "unregistered", text, status=status)
    if status == 400 and "INVALID_ARGUMENT" in codes and names_token:
        return DeadTarget("fcm", "invalid_token", text, status=status)
    return ProviderRejected("fcm", f"HTTP {status} {text}".strip(), status=status)
