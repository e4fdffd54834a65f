"""Request parameters every route module reads the same way: path ids, ``limit``, and the
JSON body (415, 413, 408). One place, so a rule and its error answer cannot drift."""

from __future__ import annotations

import asyncio
import re

from aiohttp import web

from feedsvc import intake
from feedsvc.api.app import RUNTIME, principal_of
from feedsvc.errors import (
    Forbidden,
    InvalidRequest,
    PayloadTooLarge,
    RequestTimeout,
    Unprocessable,
    UnsupportedMediaType,
)
from feedsvc.model import ID_PATTERN, ID_RULE

_ID = re.compile(ID_PATTERN)


def query_limit(request: web.Request, default: int, maximum: int) -> int:
    raw = request.query.get("limit")
    if raw is None:
        return default
    # Length first: int() of a long digit string is slow, and past 4,300 digits it raises.
    if not (len(raw) <= 6 and raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= maximum:
        raise InvalidRequest(f"limit must be an integer from 1 to {maximum}",
                             code="invalid_query", field="limit")
    return int(raw)


def inbox_owner(request: web.Request) -> str:
    """Whose inbox a request is about: the token's user, or ``user_id`` with a service key
    (a user token naming another user is 403)."""
    principal = principal_of(request)
    named = request.query.get("user_id")
    if named is not None and not intake.valid_id(named):
        raise InvalidRequest(f"user_id must be {ID_RULE}", code="invalid_query",
                             field="user_id")
    if principal.service:
        if named is None:
            raise Unprocessable("a service key must name user_id", code="missing_field",
                                field="user_id")
        return named
    assert principal.user_id is not None
    if named is not None and named != principal.user_id:
        raise Forbidden("a user token can only read its own inbox")
    return principal.user_id


def path_id(request: web.Request, name: str, pattern: re.Pattern[str] = _ID,
            rule: str = ID_RULE) -> str:
    """A path parameter checked against its rule (by default the id rule): 400 if not."""
    value = request.match_info[name]
    if not pattern.search(value):
        raise InvalidRequest(f"{name} must be {rule}", code="invalid_path", field=name)
    return value


async def read_body(request: web.Request, limit: int) -> bytes:
    """The JSON request body: 415 unless it is sent as ``application/json``; 413 as soon as
    it exceeds ``limit`` bytes (by its Content-Length, or while reading a chunked body)
    without reading the rest; 408 when it has not all arrived within FEEDSVC_BODY_TIMEOUT."""
    return await read_raw(request, limit, "application/json")


async def read_raw(request: web.Request, limit: int, content_type: str) -> bytes:
    """The request body sent as ``content_type`` (parameters such as charset allowed), with
    the 415, 413 and 408 answers of ``read_body``."""
    if request.content_type != content_type:
        raise UnsupportedMediaType(f"send the body as Content-Type: {content_type}",
                                   field="Content-Type")
    too_large = PayloadTooLarge(f"request body is larger than {limit} bytes")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    chunks, size = [], 0
    try:
        async with asyncio.timeout(request.app[RUNTIME].settings.body_timeout):
            while chunk := await request.content.read(65_536):
                size += len(chunk)
                if size > limit:
                    raise too_large
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout("the request body did not arrive in time") from None
    return b"".join(chunks)
