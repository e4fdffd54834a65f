"""OpenAPI 3.1 description of the running API (served at ``GET /openapi.json``).

The schemas are generated from the msgspec Structs that decode and encode the wire
(``msgspec.json.schema_components``), so the limits the server enforces and the ones the
document states are the same objects; the parameters reuse the patterns of
``feedsvc.model``. Every status a route can answer is listed. A test checks that every
registered route appears here with its method, and nothing more; a schemathesis run in
``make test`` checks that the server keeps to the document.
"""

from __future__ import annotations

import functools
from typing import Any

import msgspec

from feedsvc.api import delivery, ops, policy, recipients
from feedsvc.model import (
    CURSOR_PATTERN,
    ID_PATTERN,
    ID_RULE,
    Accepted,
    BulkIn,
    BulkOut,
    ErrorOut,
    EventIn,
    IdPageOut,
    PageOut,
    StatusOut,
    UserOut,
)

_STRUCTS = (EventIn, BulkIn, Accepted, BulkOut, PageOut, IdPageOut, UserOut, StatusOut, ErrorOut)
_ID = {"type": "string", "minLength": 1, "maxLength": 64, "pattern": ID_PATTERN,
       "description": ID_RULE}
_ERROR_CODES = {
    "400": "malformed request: JSON, query parameter, cursor or path id",
    "401": "no valid credential",
    "403": "the credential may not do this",
    "404": "no such route",
    "405": "method not allowed on this route",
    "408": "the request body did not arrive within FEEDSVC_BODY_TIMEOUT",
    "413": "the body is larger than the route accepts",
    "415": "the body is not sent as application/json",
    "422": "well-formed but refused (field rules, idempotency key reused, too old, ...)",
    "500": "an unexpected server error (logged under the id in the Error-Id header)",
}


def _param(name: str, where: str, schema: dict[str, Any], required: bool = False,
           description: str = "") -> dict[str, Any]:
    return {"name": name, "in": where, "required": required or where == "path",
            "schema": schema, "description": description}


def _limit(default: int, maximum: int) -> dict[str, Any]:
    return _param("limit", "query", {"type": "integer", "minimum": 1, "maximum": maximum,
                                     "default": default}, description="page size")


_CURSOR = _param("cursor", "query", {"type": "string", "pattern": CURSOR_PATTERN},
                 description="next_cursor of the page before")
_USER = _param("user_id", "path", _ID)
_AUTHOR = _param("author_id", "path", _ID)


def _json(name: str) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}


def _error(status: str) -> dict[str, Any]:
    return {"$ref": f"#/components/responses/E{status}"}


_SERVICE: list[dict[str, list[str]]] = [{"serviceKey": []}]
_ANY: list[dict[str, list[str]]] = [{"serviceKey": []}, {"userToken": []}]


def _op(summary: str, security: list[dict[str, list[str]]] | None, ok: dict[str, Any],
        parameters: list[dict[str, Any]] | None = None,
        body: str | None = None) -> dict[str, Any]:
    statuses = ["400", "404", "405", "500"]
    if security:
        statuses += ["401", "403", "422", "429", "503"]
    if body:
        statuses += ["408", "413", "415"]
    responses = dict(ok)
    responses.update({s: _error(s) for s in sorted(statuses)})
    op: dict[str, Any] = {"summary": summary, "responses": responses,
                          "security": security if security is not None else []}
    if parameters:
        op["parameters"] = parameters
    if body:
        op["requestBody"] = {"required": True, **_json(body)}
    return op


@functools.cache
def spec() -> dict[str, Any]:
    (_, schemas) = msgspec.json.schema_components(
        _STRUCTS + recipients.SCHEMA_TYPES + delivery.SCHEMA_TYPES + policy.SCHEMA_TYPES
        + ops.SCHEMA_TYPES,
        ref_template="#/components/schemas/{name}")
    responses: dict[str, Any] = {
        f"E{status}": {"description": text, **_json("ErrorOut")}
        for status, text in _ERROR_CODES.items()
    }
    responses["E500"]["headers"] = {"Error-Id": {"schema": {"type": "string"}}}
    responses["E503"] = {
        "description": "a dependency is briefly unavailable: retry after Retry-After seconds",
        "headers": {"Retry-After": {"required": True,
                                    "schema": {"type": "integer", "minimum": 0}}},
        **_json("ErrorOut")}
    responses["E429"] = {
        "description": "over the caller's rate limit (FEEDSVC_RATE_LIMIT_SERVICE / _USER); "
                       "nothing was changed",
        "headers": {"Retry-After": {"required": True,
                                    "schema": {"type": "integer", "minimum": 0}},
                    **{name: {"schema": {"type": "integer", "minimum": 0}} for name in (
                        "RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset")}},
        **_json("ErrorOut")}
    responses["E503ready"] = {"description": "the store or the queue does not answer",
                              **_json("ErrorOut")}
    page = {"200": {"description": "a page", **_json("PageOut")}}
    ids = {"200": {"description": "a page", **_json("IdPageOut")}}
    done = {"204": {"description": "in effect"}}
    paths: dict[str, Any] = {
        "/v1/events": {"post": _op(
            "Accept one event (idempotent on event_id)", _SERVICE,
            {"202": {"description": "accepted", **_json("Accepted")},
             "200": {"description": "duplicate", **_json("Accepted")}},
            body="EventIn")},
        "/v1/inbox": {"get": _op(
            "The caller's merged inbox, newest first", _ANY, page,
            [_limit(50, 200), _CURSOR,
             _param("user_id", "query", _ID, description="required with a service key")])},
        "/v1/users/{user_id}/following/{author_id}": {
            "put": _op("Follow (idempotent)", _SERVICE, done, [_USER, _AUTHOR]),
            "delete": _op("Unfollow (idempotent)", _SERVICE, done, [_USER, _AUTHOR]),
        },
        "/v1/follows/bulk": {"post": _op(
            "Apply many follows", _SERVICE,
            {"200": {"description": "applied", **_json("BulkOut")}}, body="BulkIn")},
        "/v1/users/{user_id}": {"get": _op(
            "Counts and routing mode", _SERVICE,
            {"200": {"description": "the user", **_json("UserOut")}}, [_USER])},
        "/v1/users/{user_id}/followers": {"get": _op(
            "Followers, paged", _SERVICE, ids, [_USER, _limit(100, 1000), _CURSOR])},
        "/v1/users/{user_id}/following": {"get": _op(
            "Authors followed, paged", _SERVICE, ids, [_USER, _limit(100, 1000), _CURSOR])},
        "/v1/users/{user_id}/events": {"get": _op(
            "An author's own public events, newest first", _ANY, page,
            [_USER, _limit(50, 200), _CURSOR])},
        "/healthz": {"get": _op("Liveness", None,
                                {"200": {"description": "alive", **_json("StatusOut")}})},
        "/readyz": {"get": _op("Store and queue answer", None,
                               {"200": {"description": "ready", **_json("StatusOut")},
                                "503": _error("503ready")})},
        "/openapi.json": {"get": _op("This document", None, {"200": {
            "description": "OpenAPI 3.1", "content": {"application/json": {
                "schema": {"type": "object"}}}}})},
    }
    paths.update(recipients.openapi_paths(_op, _param, _ID))
    paths.update(delivery.openapi_paths(_op, _param, _ID, _limit(50, 500)))
    for path, operations in policy.openapi_paths(_op, _param, _ID, _error).items():
        paths.setdefault(path, {}).update(operations)
    paths.update(ops.openapi_paths(_op))
    return {
        "openapi": "3.1.0",
        "info": {"title": "feedsvc", "version": "0.1.0",
                 "description": "Feed/inbox backend with hybrid push-pull timelines."},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "responses": responses,
            "securitySchemes": {
                "serviceKey": {"type": "http", "scheme": "bearer",
                               "description": "a key from FEEDSVC_SERVICE_KEYS"},
                "userToken": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
            },
        },
    }
