"""Credentials: service keys and user tokens (JWT, HS256).

``Authorization: Bearer <credential>`` carries either a key from ``FEEDSVC_SERVICE_KEYS``
or a user token signed with ``FEEDSVC_JWT_SECRET`` (HS256 only) whose ``sub`` is a valid user
id and whose ``iat`` and ``exp`` are required integers, at most ``FEEDSVC_JWT_MAX_TTL`` apart
(30 s of clock skew allowed). A credential is RFC 6750's ``b64token`` characters; anything
else (non-ASCII bytes included) is a 401, never an encoding error.
"""

from __future__ import annotations

import hmac
import re
import time
from dataclasses import dataclass

import jwt

from feedsvc.errors import Unauthenticated
from feedsvc.model import ID_PATTERN

LEEWAY_S = 30
ALGORITHM = "HS256"
MIN_SECRET_BYTES = 32  # RFC 7518 3.2: an HS256 key at least as long as the hash
DEFAULT_MAX_TTL_S = 30 * 86_400
_B64TOKEN = re.compile(r"[A-Za-z0-9._~+/-]+=*")
_USER_ID = re.compile(ID_PATTERN)


@dataclass(frozen=True)
class Principal:
    """Who is calling: a service (any user's data) or one user (their own data)."""

    service: bool
    user_id: str | None = None


def issue_token(secret: str, user_id: str, ttl_s: int = 3600, now: float | None = None) -> str:
    issued = int(now if now is not None else time.time())
    return jwt.encode({"sub": user_id, "iat": issued, "exp": issued + ttl_s}, secret,
                      algorithm=ALGORITHM)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def authenticate(header: str | None, service_keys: tuple[str, ...],
                 jwt_secret: str | None, max_ttl_s: float = DEFAULT_MAX_TTL_S) -> Principal:
    if not header:
        raise Unauthenticated("missing Authorization: Bearer credential")
    scheme, _, credential = header.partition(" ")
    credential = credential.strip(" ")
    if scheme.lower() != "bearer" or not credential:
        raise Unauthenticated("Authorization must be 'Bearer <credential>'")
    if not _B64TOKEN.fullmatch(credential):
        raise Unauthenticated("invalid credential")
    for key in service_keys:
        if hmac.compare_digest(key.encode(), credential.encode()):
            return Principal(service=True)
    if jwt_secret is None:
        raise Unauthenticated("invalid credential")
    try:
        claims = jwt.decode(credential, jwt_secret, algorithms=[ALGORITHM], leeway=LEEWAY_S,
                            options={"require": ["exp", "iat", "sub"]})
    except jwt.ExpiredSignatureError as exc:
        raise Unauthenticated("token expired", code="token_expired") from exc
    except jwt.InvalidTokenError as exc:
        raise Unauthenticated("invalid credential") from exc
    # PyJWT converts a numeric string; the JWT spec (RFC 7519 2) says NumericDate is a number.
    if not all(_is_int(claims[name]) for name in ("exp", "iat")) or (
            "nbf" in claims and not _is_int(claims["nbf"])):
        raise Unauthenticated("token times (exp, iat, nbf) must be integers")
    if claims["exp"] - claims["iat"] > max_ttl_s:
        raise Unauthenticated("token lives longer than FEEDSVC_JWT_MAX_TTL allows")
    subject = claims.get("sub")
    if not isinstance(subject, str) or not _USER_ID.search(subject):
        raise Unauthenticated("token subject is not a valid user id")
    return Principal(service=False, user_id=subject)
