"""Logging: ``FEEDSVC_LOG_FORMAT=text`` (default, for a terminal) or ``json`` (one object per
line, for a log pipeline), and the ids a line is about.

A JSON line carries ``time`` (RFC 3339, UTC, milliseconds), ``level``, ``logger``,
``message``, and ``event_id``, ``entry_id`` and ``user_id`` when known; an access log line
also ``method``, ``path``, ``route``, ``status``, ``duration_ms`` and ``remote``; a line with an
exception ``exc``. The ids come from ``extra=`` or, more often, from the context the code
runs in: ``bound(event_id=...)`` sets them for a block (a worker's task, an HTTP request),
and every line logged inside it carries them, in the text format too (``[event_id=...]``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from contextvars import ContextVar, Token
from typing import Any

CONTEXT_FIELDS = ("event_id", "entry_id", "user_id")
# Access log fields (``feedsvc.access``), written as they are in JSON.
ACCESS_FIELDS = ("method", "path", "route", "status", "duration_ms", "remote")
_VARS: dict[str, ContextVar[str | None]] = {
    name: ContextVar(f"feedsvc_{name}", default=None) for name in CONTEXT_FIELDS}
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

access_log = logging.getLogger("feedsvc.access")


def bind(**ids: str | None) -> None:
    """Set ids for the rest of the current context (an HTTP request's task resets them at
    its end: ``feedsvc.metrics.http_middleware``)."""
    for name, value in ids.items():
        _VARS[name].set(value)


@contextlib.contextmanager
def bound(**ids: str | None) -> Iterator[None]:
    """Set ids for the block, then restore what was there."""
    tokens: list[tuple[ContextVar[str | None], Token[str | None]]] = [
        (_VARS[name], _VARS[name].set(value)) for name, value in ids.items()]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def current() -> dict[str, str]:
    """The ids known in this context."""
    return {name: value for name, var in _VARS.items() if (value := var.get()) is not None}


class ContextFilter(logging.Filter):
    """Copies the context's ids onto each record (``extra=`` given to the call wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in _VARS.items():
            if getattr(record, name, None) is None:
                value = var.get()
                if value is not None:
                    setattr(record, name, value)
        return True


class TextFormatter(logging.Formatter):
    """The usual one-line text, with the ids the line is about at its end."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        ids = " ".join(f"{name}={value}" for name in CONTEXT_FIELDS
                       if (value := getattr(record, name, None)) is not None)
        if not ids:
            return text
        first, newline, rest = text.partition("\n")  # after the message, before a traceback
        return f"{first} [{ids}]{newline}{rest}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        seconds = int(record.created)
        millis = int((record.created - seconds) * 1000)
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
                    + f".{millis:03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS + ACCESS_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        return json.dumps(out, ensure_ascii=False, default=str)


def configure(level: str = "INFO", fmt: str = "text") -> logging.Handler:
    """The root logger writes to stderr in ``fmt`` (text or json) at ``level``; returns the
    handler (callers add their own filters to it)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler
