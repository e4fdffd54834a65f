"""HTTP API: the aiohttp composition root (``init_app``), auth and error mapping.

One middleware authenticates by the route's declared access and maps the error tree of
``feedsvc.errors`` to ``{"error": {"code", "message", "field"}}`` responses; nothing a client
sends can produce a 500. It ends with a catch-all: an unexpected exception is logged once,
with a traceback, under an error id that the 500 answer carries (``Error-Id`` header and
message). A client that goes away mid-request is one INFO line. Handlers live in
``feedsvc.api.routes``; the listening socket and its connection limits in
``feedsvc.api.server``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Literal

import msgspec
from aiohttp import http_exceptions, web

from feedsvc import logs, metrics
from feedsvc.auth import Principal, authenticate
from feedsvc.config import Settings
from feedsvc.errors import ClientError, FeedError, RetryableError
from feedsvc.model import MAX_BULK_BODY_BYTES, ErrorBody, ErrorOut
from feedsvc.ratelimit import Buckets, LocalBuckets, RedisBuckets
from feedsvc.runtime import Runtime, freeze_startup_heap, open_runtime
from feedsvc.workers import run_workers

log = logging.getLogger(__name__)

Access = Literal["none", "service", "any"]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

RUNTIME = web.AppKey("runtime", Runtime)
ACCESS = web.AppKey("access", dict)
PRINCIPAL = web.RequestKey("principal", Principal)
BUCKETS = web.AppKey("buckets", Buckets)  # set only when a rate limit is configured
NOTICES_STOP_S = 5.0  # how long shutdown waits for the notices listener to stop


def json_response(body: object, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(body), status=status,
                        content_type="application/json")


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    response = json_response(ErrorOut(ErrorBody(code, message, field)), status)
    if headers:
        response.headers.update(headers)
    return response


_HTTP_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed",
               408: "request_timeout", 413: "payload_too_large", 431: "headers_too_large"}
_KEPT_HEADERS = ("Allow",)  # of aiohttp's own answers; its text/plain Content-Type is not


def internal_error(exc: BaseException, what: str) -> web.Response:
    """Log an unexpected exception once, with its traceback, and answer a JSON 500 naming
    the id it was logged under."""
    error_id = uuid.uuid4().hex[:16]
    log.error("internal error %s in %s", error_id, what, exc_info=exc)
    return error_response(500, "internal_error",
                          f"the request could not be completed (error id {error_id})",
                          headers={"Error-Id": error_id})


@web.middleware
async def api_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        route = request.match_info.route
        access: Access = request.app[ACCESS].get(route.resource.canonical if route.resource
                                                 else "", {}).get(request.method, "none")
        if access != "none":
            rt = request.app[RUNTIME]
            principal = authenticate(request.headers.get("Authorization"),
                                     rt.settings.service_keys, rt.settings.jwt_secret,
                                     rt.settings.jwt_max_ttl)
            if access == "service" and not principal.service:
                return error_response(403, "forbidden", "this route needs a service key")
            request[PRINCIPAL] = principal
            logs.bind(user_id=principal.user_id)
            limited = await _rate_limited(request, principal, handler)
            if limited is not None:
                return limited
        return await handler(request)
    except ClientError as exc:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return error_response(exc.status, exc.code, exc.message, exc.field, headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "http_error")
        kept = {k: v for k, v in exc.headers.items() if k in _KEPT_HEADERS}
        return error_response(exc.status, code, exc.reason, headers=kept)
    except RetryableError as exc:
        log.warning("dependency unavailable: %s", exc)
        return error_response(503, "unavailable", "a dependency is unavailable; retry",
                              headers={"Retry-After": "1"})
    except http_exceptions.HttpProcessingError as exc:  # a malformed body (bad chunking, ...)
        log.info("malformed request body from %s: %s", request.remote, exc.message)
        return error_response(400, "invalid_request", "the request body is malformed")
    except ConnectionError as exc:  # the client went away mid-request: nobody to answer
        log.info("client %s went away during %s %s: %s", request.remote, request.method,
                 request.path, exc)
        return error_response(400, "client_gone", "the connection was lost")
    except Exception as exc:
        return internal_error(exc, f"{request.method} {request.path}")


async def _rate_limited(request: web.Request, principal: Principal,
                        handler: Handler) -> web.StreamResponse | None:
    """Take a token from the caller's bucket: None when no limit applies, else the answer
    (429 before the handler runs, or the handler's answer with the RateLimit-* headers)."""
    settings = request.app[RUNTIME].settings
    rate = settings.rate_limit_service if principal.service else settings.rate_limit_user
    buckets = request.app.get(BUCKETS)
    if rate is None or buckets is None:
        return None
    if principal.service:
        credential = request.headers.get("Authorization", "").encode()
        key = "service:" + hashlib.sha256(credential).hexdigest()[:24]
    else:
        key = f"user:{principal.user_id}"
    decision = await buckets.take(key, rate)
    if not decision.allowed:
        return error_response(429, "rate_limited",
                              f"too many requests; retry after {decision.retry_after_s}s",
                              headers=decision.headers(rate))
    response = await handler(request)
    response.headers.update(decision.headers(rate))
    return response


def principal_of(request: web.Request) -> Principal:
    return request[PRINCIPAL]


def init_app(rt: Runtime, *, workers: int = 0) -> web.Application:
    """Build the application around an open runtime; ``workers`` > 0 also runs that many
    fan-out consumers inside this process (``feedsvc serve``)."""
    from feedsvc.api import delivery, ops, policy, recipients, routes

    app = web.Application(middlewares=[metrics.http_middleware(rt.settings.access_log),
                                       api_middleware], client_max_size=MAX_BULK_BODY_BYTES)
    app[RUNTIME] = rt
    app[ACCESS] = {}
    for method, path, handler, access in (routes.ROUTES + recipients.ROUTES + delivery.ROUTES
                                          + policy.ROUTES + ops.ROUTES):
        app.router.add_route(method, path, handler)
        app[ACCESS].setdefault(path, {})[method] = access
    app.cleanup_ctx.append(_notices_ctx(rt))
    if rt.settings.metrics_public:
        app[ACCESS][ops.METRICS_PATH]["GET"] = "none"
    if workers > 0:
        app.cleanup_ctx.append(_workers_ctx(rt, workers))
    if rt.settings.rate_limit_service or rt.settings.rate_limit_user:
        app.cleanup_ctx.append(_buckets_ctx(rt.settings))
    return app


def _notices_ctx(rt: Runtime) -> Callable[[web.Application], AsyncIterator[None]]:
    """Other processes' notices (authors' posts) reach this process's read caches."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(rt.notices.listen())
        yield
        task.cancel()
        # Bounded: a Redis client stuck in its own retries must not hold the shutdown.
        done, _ = await asyncio.wait({task}, timeout=NOTICES_STOP_S)
        if not done:
            log.warning("read-cache notices did not stop within %.0f s; left behind",
                        NOTICES_STOP_S)
        elif not task.cancelled() and task.exception() is not None:
            log.warning("read-cache notices had ended: %s", task.exception())

    return ctx


def _buckets_ctx(settings: Settings) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        buckets: Buckets
        if settings.redis_url and not settings.embedded:
            buckets = RedisBuckets.open(settings.redis_url, settings.queue_prefix,
                                        cluster=settings.redis_cluster)
        else:
            buckets = LocalBuckets()
        app[BUCKETS] = buckets
        yield
        await buckets.close()

    return ctx


def _workers_ctx(
    rt: Runtime, workers: int
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        from feedsvc.delivery.providers.registry import open_providers

        providers = open_providers(rt.settings)
        providers.warn_unconfigured()
        stop = asyncio.Event()
        task = asyncio.create_task(run_workers(rt, workers, stop, providers=providers))

        def ended(done: asyncio.Task[int]) -> None:
            if stop.is_set() or done.cancelled():
                return
            exc = done.exception()
            rt.health.fail(f"in-process workers ended: {exc!r}")
            log.error("in-process workers ended", exc_info=exc)

        task.add_done_callback(ended)
        yield
        stop.set()
        try:
            await asyncio.wait_for(task, timeout=30)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        finally:
            await providers.aclose()

    return ctx


async def serve(settings: Settings, *, workers: int, sock: socket.socket | None = None
                ) -> None:
    """Run the API (and optionally in-process workers) until cancelled, listening on
    ``sock`` when given (one of ``feedsvc api --processes``), else on the configured
    address. If the in-process workers end on their own (they never should), the process
    ends with an error rather than go on accepting events nobody fans out."""
    from feedsvc.api.server import GuardedAppRunner, Limits
    from feedsvc.ops import reporting
    from feedsvc.queue.base import QUEUES

    async with open_runtime(settings) as rt:
        app = init_app(rt, workers=workers)
        # Access logs are written by ``metrics.http_middleware`` (FEEDSVC_ACCESS_LOG).
        runner = GuardedAppRunner(app, Limits.of(settings), access_log=None)
        await runner.setup()
        site: web.BaseSite = (web.SockSite(runner, sock) if sock is not None
                              else web.TCPSite(runner, settings.host, settings.port))
        await site.start()
        freeze_startup_heap()
        log.info("feedsvc listening on %s (pid %d)", site.name, os.getpid())
        try:
            async with reporting(rt, "serve" if workers else "api",
                                 QUEUES if workers else ()):
                await rt.health.ended.wait()
            raise FeedError(rt.health.failed or "in-process workers ended")
        finally:
            await runner.cleanup()
