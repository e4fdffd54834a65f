"""Fake FCM HTTP v1 with its OAuth2 token endpoint.

``POST /token`` takes the JWT-bearer grant and checks the assertion: RS256 signature by the
service account's key, ``iss`` = its client_email, ``aud`` = this token URI, the FCM scope,
an ``exp`` in the future. ``POST /v1/projects/{project}/messages:send`` checks the bearer
token it issued and the message's shape, then answers as FCM does: 200 ``{"name"}``,
404 ``UNREGISTERED`` for dead tokens, 400 ``INVALID_ARGUMENT`` naming ``message.token`` for
malformed ones, 401 for unknown or expired access tokens, 429/503 with Retry-After.
"""

from __future__ import annotations

import functools
import json
import secrets
import time
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.fakes.ledger import Behaviour, pause, retry_headers
from tests.fakes.web import HttpFake

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
CLIENT_EMAIL = "feedsvc-test@fake-project.iam.gserviceaccount.com"

STATUS_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
                404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL",
                503: "UNAVAILABLE"}
ERROR_CODES = {400: "INVALID_ARGUMENT", 403: "SENDER_ID_MISMATCH", 404: "UNREGISTERED",
               429: "QUOTA_EXCEEDED", 500: "INTERNAL", 503: "UNAVAILABLE"}


@functools.cache
def shared_key() -> rsa.RSAPrivateKey:
    """One service-account key per test process (RSA key generation takes a while)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def fcm_error(status: int, message: str, *, token_field: bool = False,
              headers: dict[str, str] | None = None) -> web.Response:
    details: list[dict[str, Any]] = [{
        "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
        "errorCode": ERROR_CODES.get(status, "UNSPECIFIED_ERROR")}]
    if token_field:
        details.append({"@type": "type.googleapis.com/google.rpc.BadRequest",
                        "fieldViolations": [{"field": "message.token",
                                             "description": "Invalid registration token"}]})
    body = {"error": {"code": status, "message": message,
                      "status": STATUS_NAMES.get(status, "UNKNOWN"), "details": details}}
    return web.json_response(body, status=status, headers=headers)


class FakeFcm(HttpFake):
    def __init__(self, behaviour: Behaviour | None = None, *, project: str = "fake-project",
                 token_lifetime: int = 3600, key: rsa.RSAPrivateKey | None = None) -> None:
        super().__init__(behaviour)
        self.project = project
        self.token_lifetime = token_lifetime
        self.key = key or shared_key()
        self.invalid_tokens: set[str] = set()  # answered 400 INVALID_ARGUMENT naming the token
        self.access_tokens: dict[str, float] = {}  # issued token -> expires at (time.time)
        self.token_requests = 0
        self.bad_assertions = 0

    @property
    def token_uri(self) -> str:
        return f"{self.url}/token"

    def service_account(self) -> dict[str, str]:
        pem = self.key.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()).decode()
        return {"type": "service_account", "project_id": self.project,
                "private_key_id": "fake-key-1", "private_key": pem,
                "client_email": CLIENT_EMAIL, "token_uri": self.token_uri}

    def write_credentials(self, path: Path) -> Path:
        path.write_text(json.dumps(self.service_account()))
        return path

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/token", self.token)
        app.router.add_post(r"/v1/projects/{project}/messages:send", self.send)

    async def token(self, request: web.Request) -> web.Response:
        self.token_requests += 1
        form = await request.post()
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        try:
            claims = jwt.decode(
                str(form.get("assertion", "")), self.key.public_key(), algorithms=["RS256"],
                audience=self.token_uri, issuer=CLIENT_EMAIL,
                options={"require": ["iss", "aud", "iat", "exp", "scope"]})
            if SCOPE not in str(claims["scope"]).split():
                raise jwt.InvalidTokenError("scope lacks firebase.messaging")
        except jwt.InvalidTokenError as exc:
            self.bad_assertions += 1
            return web.json_response({"error": "invalid_grant",
                                      "error_description": str(exc)}, status=400)
        token = f"ya29.fake-{secrets.token_urlsafe(16)}"
        self.access_tokens[token] = time.time() + self.token_lifetime
        return web.json_response({"access_token": token, "expires_in": self.token_lifetime,
                                  "token_type": "Bearer"})

    async def send(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ")
        if not auth.startswith("Bearer ") or self.access_tokens.get(token, 0) < time.time():
            return fcm_error(401, "Request had invalid authentication credentials.")
        if request.match_info["project"] != self.project:
            return fcm_error(404, "Requested entity was not found.")
        try:
            body = await request.json()
            message = body["message"]
            target = message["token"]
            title, text = message["notification"]["title"], message["notification"]["body"]
            data = message.get("data", {})
            if not (isinstance(target, str) and isinstance(title, str)
                    and isinstance(text, str) and isinstance(data, dict)
                    and all(isinstance(v, str) for v in data.values())):
                raise TypeError("wrong types")
        except (ValueError, KeyError, TypeError) as exc:
            return fcm_error(400, f"Invalid JSON payload received. {exc}")
        decision = self.ledger.decide(self.behaviour, request.headers.get("Idempotency-Key"),
                                      target)
        await pause(self.behaviour, decision)
        name = f"projects/{self.project}/messages/"
        if decision.outcome == "missing_key":
            return fcm_error(400, "Idempotency-Key missing")
        if decision.outcome == "duplicate":
            return web.json_response({"name": name + decision.message_id})
        if decision.outcome in ("scripted", "error", "hang"):
            status = decision.status
            return fcm_error(status, "injected failure",
                             headers=retry_headers(self.behaviour, status))
        if decision.outcome == "dead":
            return fcm_error(404, "Requested entity was not found.")
        if target in self.invalid_tokens:
            return fcm_error(400, "The registration token is not a valid FCM registration "
                             "token", token_field=True)
        key = request.headers["Idempotency-Key"]
        message_id = self.ledger.accept(key, {"token": target, "title": title, "body": text,
                                              "data": data})
        return web.json_response({"name": name + message_id})
