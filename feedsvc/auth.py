"""Credentials: service keys and user tokens (JWT, HS256).

``Authorization: Bearer <credential>`` carries either a key from ``FEEDSVC_SERVICE_KEYS``
or a user token signed with ``FEEDSVC_JWT_SECRET`` whose ``sub`` is the user id and whose
``exp`` is required (30 s of clock skew allowed).
"""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass

import jwt

from feedsvc.errors import Unauthenticated

LEEWAY_S = 30
ALGORITHM = "HS256"


@dataclass(frozen=True)
class Principal:
    """Who is calling: a service (any user's data) or one user (their own data)."""

    service: bool
    user_id: str | None = None


def issue_token(secret: str, user_id: str, ttl_s: int = 3600, now: float | None = None) -> str:
    issued = int(now if now is not None else time.time())
    return jwt.encode({"sub": user_id, "iat": issued, "exp": issued + ttl_s}, secret,
                      algorithm=ALGORITHM)


def authenticate(header: str | None, service_keys: tuple[str, ...],
                 jwt_secret: str | None) -> Principal:
    if not header:
        raise Unauthenticated("missing Authorization: Bearer credential")
    scheme, _, credential = header.partition(" ")
    credential = credential.strip()
    if scheme.lower() != "bearer" or not credential:
        raise Unauthenticated("Authorization must be 'Bearer <credential>'")
    for key in service_keys:
        if hmac.compare_digest(key.encode(), credential.encode()):
            return Principal(service=True)
    if jwt_secret is None:
        raise Unauthenticated("invalid credential")
    try:
        claims = jwt.decode(credential, jwt_secret, algorithms=[ALGORITHM], leeway=LEEWAY_S,
                            options={"require": ["exp", "sub"]})
    except jwt.ExpiredSignatureError as exc:
        raise Unauthenticated("token expired", code="token_expired") from exc
    except jwt.InvalidTokenError as exc:
        raise Unauthenticated("invalid credential") from exc
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise Unauthenticated("token has no subject")
    return Principal(service=False, user_id=subject)
