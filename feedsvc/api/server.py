"""The listening side of the API: aiohttp's HTTP/1.1 server with the limits a public
endpoint needs against slow or idle clients.

``GuardedAppRunner`` is ``web.AppRunner`` whose connections are ``GuardedHandler`` s:

- **header timeout** (``FEEDSVC_HEADER_TIMEOUT``, 10 s): from the connection's start, and on
  a kept-alive connection from the first byte of the next request, the request line and
  headers must be complete within it, or the connection is closed. A client dripping one
  byte a second holds a socket for at most this long.
- **keep-alive timeout** (``FEEDSVC_KEEPALIVE_TIMEOUT``, 75 s): a connection with no request
  in flight that sends nothing is closed (aiohttp's own timer, whose default is an hour).
- **body timeout** (``FEEDSVC_BODY_TIMEOUT``, 30 s): applied where the body is read
  (``routes.read_body``), answered 408; the rest of the body is then read and dropped for at
  most ``LINGER_S`` (so the client sees the answer) and the connection closed.
- **connection cap** (``FEEDSVC_MAX_CONNECTIONS``, 1024 per process): a new connection past
  the cap closes the oldest connection that has no request in flight (idle or still sending
  headers); when every connection is busy, the new one is closed at once. Idle sockets can
  therefore never keep a real request (``/healthz`` included) out.

aiohttp's own error answers (a malformed request line or header: 400, 431) use the JSON error
body and are logged as one INFO line, never a traceback: a client's fault is not the
server's error.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from feedsvc.config import Settings
from feedsvc.model import ErrorBody, ErrorOut

log = logging.getLogger(__name__)

_CODES = {400: "invalid_request", 408: "request_timeout", 413: "payload_too_large",
          414: "uri_too_long", 431: "headers_too_large", 501: "not_implemented"}


LINGER_S = 2.0


@dataclass(frozen=True)
class Limits:
    header_timeout: float = 10.0
    keepalive_timeout: float = 75.0
    max_connections: int = 1024

    @classmethod
    def of(cls, settings: Settings) -> Limits:
        return cls(settings.header_timeout, settings.keepalive_timeout,
                   settings.max_connections)


class GuardedHandler(RequestHandler):
    """One client connection, with a header deadline and a place under the cap."""

    def __init__(self, manager: GuardedServer, *, loop: asyncio.AbstractEventLoop,
                 **kwargs: Any) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self._guard = manager
        self._header_timer: asyncio.TimerHandle | None = None

    @property
    def idle(self) -> bool:
        """No request in flight or parsed and waiting: safe to close."""
        return not self._request_in_progress and not self._messages

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        refused = not self._guard.make_room()
        super().connection_made(transport)
        if refused:
            log.warning("connection refused: %d connections open, none idle "
                        "(FEEDSVC_MAX_CONNECTIONS)", self._guard.limits.max_connections)
            self.force_close()
            return
        self._start_header_timer()

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and self.idle:
            self._start_header_timer()  # the first bytes of the next request on this socket
        before = self._request_count
        super().data_received(data)
        if self._request_count > before:
            self._stop_header_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def _start_header_timer(self) -> None:
        self._header_timer = self._loop.call_later(self._guard.limits.header_timeout,
                                                   self._headers_late)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.idle and self.transport is not None:
            log.info("closed a connection from %s: no complete request headers within %gs "
                     "(FEEDSVC_HEADER_TIMEOUT)", self.peername, self._guard.limits.header_timeout)
            self.force_close()

    def handle_error(self, request: BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """aiohttp's answer to a request it could not parse or hand to the app: the JSON error
        body, one log line (with a traceback only for a 500, which is ours)."""
        if status >= 500:
            from feedsvc.api.app import internal_error

            response: web.Response = internal_error(exc or RuntimeError(message), "the server")
        else:
            reason = getattr(exc, "message", None) or message or "malformed request"
            log.info("refused a malformed request from %s (%d): %s", request.remote, status,
                     str(reason).splitlines()[0])
            body = ErrorOut(ErrorBody(_CODES.get(status, "invalid_request"),
                                      f"malformed request: {str(reason).splitlines()[0]}"))
            response = web.Response(status=status, body=msgspec.json.encode(body),
                                    content_type="application/json")
        if request.writer.output_size > 0:
            raise ConnectionError("a response was partly sent; the connection is closed")
        response.force_close()
        return response


class GuardedServer(web.Server):
    """aiohttp's low-level server making ``GuardedHandler`` s and keeping the cap."""

    def __init__(self, *args: Any, limits: Limits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits

    def __call__(self) -> RequestHandler:
        return GuardedHandler(self, loop=self._loop, **self._kwargs)

    def make_room(self) -> bool:
        """Called for a new connection before it counts: True if it may stay (closing the
        oldest idle connection when at the cap), False if every connection is busy."""
        if len(self._connections) < self.limits.max_connections:
            return True
        for handler in self._connections:  # oldest first
            if isinstance(handler, GuardedHandler) and handler.idle:
                log.info("closed an idle connection from %s: at FEEDSVC_MAX_CONNECTIONS=%d",
                         handler.peername, self.limits.max_connections)
                handler.force_close()
                self._connections.pop(handler, None)
                return True
        return False


class GuardedAppRunner(web.AppRunner):
    """``web.AppRunner`` serving through a ``GuardedServer``."""

    def __init__(self, app: web.Application, limits: Limits, **kwargs: Any) -> None:
        kwargs.setdefault("keepalive_timeout", limits.keepalive_timeout)
        # After an early answer (408, 413, 415) aiohttp reads and drops the rest of the body
        # for this long so that the client sees the answer; then it closes (default 10 s).
        kwargs.setdefault("lingering_time", LINGER_S)
        super().__init__(app, **kwargs)
        self.limits = limits

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # runs the app's startup hooks
        return GuardedServer(plain.request_handler, request_factory=plain.request_factory,
                             handler_cancellation=plain.handler_cancellation,
                             loop=asyncio.get_running_loop(), limits=self.limits,
                             **plain._kwargs)
