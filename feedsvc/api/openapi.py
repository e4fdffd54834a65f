"""OpenAPI 3.1 description of the running API (served at ``GET /openapi.json``).

A test checks that every registered route appears here with its method, and nothing more.
"""

from __future__ import annotations

from typing import Any

import msgspec

from feedsvc.api import recipients
from feedsvc.model import EVENT_ID_PATTERN, MAX_AUDIENCE, MAX_BULK_FOLLOWS

_ERROR = {"$ref": "#/components/responses/Error"}
_ID = {"type": "string", "minLength": 1, "maxLength": 64}


def _param(name: str, where: str, schema: dict[str, Any], required: bool = False,
           description: str = "") -> dict[str, Any]:
    return {"name": name, "in": where, "required": required or where == "path",
            "schema": schema, "description": description}


_LIMIT = _param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 200,
                                   "default": 50})
_ID_LIMIT = _param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 1000,
                                      "default": 100})
_CURSOR = _param("cursor", "query", {"type": "string"},
                 description="next_cursor of the page before")
_USER = _param("user_id", "path", _ID)
_AUTHOR = _param("author_id", "path", _ID)


def _json(ref: str) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}}


def _op(summary: str, security: list[dict[str, list[str]]] | None, responses: dict[str, Any],
        parameters: list[dict[str, Any]] | None = None,
        body: str | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if parameters:
        op["parameters"] = parameters
    if body:
        op["requestBody"] = {"required": True, **_json(body)}
    op["security"] = security if security is not None else []
    return op


_SERVICE: list[dict[str, list[str]]] = [{"serviceKey": []}]
_ANY: list[dict[str, list[str]]] = [{"serviceKey": []}, {"userToken": []}]
_AUTH_ERRORS = {"400": _ERROR, "401": _ERROR, "403": _ERROR, "422": _ERROR, "503": _ERROR}


def spec() -> dict[str, Any]:
    item = {
        "type": "object",
        "required": ["event_id", "author_id", "kind", "created_at", "priority", "object_id",
                     "payload", "via"],
        "properties": {
            "event_id": {"type": "string"}, "author_id": {"type": "string"},
            "kind": {"type": "string"},
            "created_at": {"type": "string", "format": "date-time"},
            "priority": {"enum": ["high", "medium", "low"]},
            "object_id": {"type": ["string", "null"]},
            "payload": {"type": "object"},
            "via": {"enum": ["push", "pull"]},
        },
    }
    schemas: dict[str, Any] = {
        "EventIn": {
            "type": "object", "additionalProperties": False,
            "required": ["event_id", "author_id", "kind", "payload"],
            "properties": {
                "event_id": {"type": "string", "pattern": EVENT_ID_PATTERN},
                "author_id": _ID, "kind": {"type": "string", "minLength": 1, "maxLength": 64},
                "created_at": {"oneOf": [{"type": "string", "format": "date-time"},
                                         {"type": "integer", "description": "epoch ms"}]},
                "priority": {"enum": ["high", "medium", "low"], "default": "medium"},
                "object_id": {"type": "string", "minLength": 1, "maxLength": 128},
                "audience": {"type": "object", "additionalProperties": False,
                             "required": ["users"],
                             "properties": {"users": {"type": "array", "items": _ID,
                                                      "minItems": 1,
                                                      "maxItems": MAX_AUDIENCE}}},
                "payload": {"type": "object", "description": "at most 4 KiB as JSON"},
            },
        },
        "Accepted": {
            "type": "object", "required": ["event_id", "status"],
            "properties": {"event_id": {"type": "string"},
                           "status": {"enum": ["accepted", "duplicate"]},
                           "route": {"enum": ["push", "pull", "direct"]}},
        },
        "InboxItem": item,
        "Page": {"type": "object", "required": ["items", "next_cursor"],
                 "properties": {"items": {"type": "array", "items": item},
                                "next_cursor": {"type": ["string", "null"]}}},
        "IdPage": {"type": "object", "required": ["items", "next_cursor"],
                   "properties": {"items": {"type": "array", "items": {"type": "string"}},
                                  "next_cursor": {"type": ["string", "null"]}}},
        "User": {"type": "object", "required": ["user_id", "followers", "following",
                                                "celebrity"],
                 "properties": {"user_id": {"type": "string"},
                                "followers": {"type": "integer"},
                                "following": {"type": "integer"},
                                "celebrity": {"type": "boolean"}}},
        "BulkFollows": {
            "type": "object", "additionalProperties": False, "required": ["follows"],
            "properties": {"follows": {"type": "array", "maxItems": MAX_BULK_FOLLOWS, "items": {
                "type": "object", "additionalProperties": False,
                "required": ["user_id", "author_id"],
                "properties": {"user_id": _ID, "author_id": _ID}}}},
        },
        "Applied": {"type": "object", "required": ["applied"],
                    "properties": {"applied": {"type": "integer"}}},
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["code", "message", "field"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"},
                           "field": {"type": ["string", "null"]}}}}},
        "Status": {"type": "object", "properties": {"status": {"type": "string"}}},
    }
    ok = {"description": "OK"}
    paths: dict[str, Any] = {
        "/v1/events": {"post": _op(
            "Accept one event (idempotent on event_id)", _SERVICE,
            {"202": {"description": "accepted", **_json("Accepted")},
             "200": {"description": "duplicate", **_json("Accepted")},
             "413": _ERROR, **_AUTH_ERRORS},
            body="EventIn")},
        "/v1/inbox": {"get": _op(
            "The caller's merged inbox, newest first", _ANY,
            {"200": {"description": "a page", **_json("Page")}, **_AUTH_ERRORS},
            [_LIMIT, _CURSOR, _param("user_id", "query", _ID,
                                     description="required with a service key")])},
        "/v1/users/{user_id}/following/{author_id}": {
            "put": _op("Follow (idempotent)", _SERVICE,
                       {"204": {"description": "in effect"}, **_AUTH_ERRORS}, [_USER, _AUTHOR]),
            "delete": _op("Unfollow (idempotent)", _SERVICE,
                          {"204": {"description": "in effect"}, **_AUTH_ERRORS},
                          [_USER, _AUTHOR]),
        },
        "/v1/follows/bulk": {"post": _op(
            "Apply many follows", _SERVICE,
            {"200": {"description": "applied", **_json("Applied")}, "413": _ERROR,
             **_AUTH_ERRORS}, body="BulkFollows")},
        "/v1/users/{user_id}": {"get": _op(
            "Counts and routing mode", _SERVICE,
            {"200": {"description": "the user", **_json("User")}, **_AUTH_ERRORS}, [_USER])},
        "/v1/users/{user_id}/followers": {"get": _op(
            "Followers, paged", _SERVICE,
            {"200": {"description": "a page", **_json("IdPage")}, **_AUTH_ERRORS},
            [_USER, _ID_LIMIT, _CURSOR])},
        "/v1/users/{user_id}/following": {"get": _op(
            "Authors followed, paged", _SERVICE,
            {"200": {"description": "a page", **_json("IdPage")}, **_AUTH_ERRORS},
            [_USER, _ID_LIMIT, _CURSOR])},
        "/v1/users/{user_id}/events": {"get": _op(
            "An author's own public events, newest first", _ANY,
            {"200": {"description": "a page", **_json("Page")}, **_AUTH_ERRORS},
            [_USER, _LIMIT, _CURSOR])},
        "/healthz": {"get": _op("Liveness", None, {"200": ok})},
        "/readyz": {"get": _op("Store and queue answer", None,
                               {"200": ok, "503": _ERROR})},
        "/openapi.json": {"get": _op("This document", None, {"200": ok})},
    }
    paths.update(recipients.openapi_paths(_op, _param, _AUTH_ERRORS))
    _, generated = msgspec.json.schema_components(recipients.SCHEMA_TYPES,
                                                  ref_template="#/components/schemas/{name}")
    schemas.update(generated)
    return {
        "openapi": "3.1.0",
        "info": {"title": "feedsvc", "version": "0.1.0",
                 "description": "Feed/inbox backend with hybrid push-pull timelines."},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "responses": {"Error": {"description": "error", **_json("Error")}},
            "securitySchemes": {
                "serviceKey": {"type": "http", "scheme": "bearer",
                               "description": "a key from FEEDSVC_SERVICE_KEYS"},
                "userToken": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
            },
        },
    }
