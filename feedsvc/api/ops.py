"""Routes for operators: ``GET /metrics`` (Prometheus; the service key unless
``FEEDSVC_METRICS_PUBLIC=true``), ``GET /v1/status`` (the figures of ``feedsvc.ops``, service
key) and ``GET /status``, the status page: one HTML file shipped in the package
(``feedsvc/static/status.html``: no CDN, no build step), which asks for the service key once,
keeps it in the tab's ``sessionStorage`` and reads ``/v1/status`` and ``/v1/dlq`` every 2 s.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from aiohttp import web

from feedsvc import metrics, ops
from feedsvc.api.app import RUNTIME, Access, Handler, error_response, json_response
from feedsvc.auth import authenticate
from feedsvc.errors import ClientError
from feedsvc.runtime import Runtime

log = logging.getLogger(__name__)

METRICS_PATH = "/metrics"


@functools.cache
def status_page() -> bytes:
    return (resources.files("feedsvc") / "static" / "status.html").read_bytes()


async def get_metrics(request: web.Request) -> web.Response:
    return await metrics.metrics_response(request.app[RUNTIME])


async def get_status(request: web.Request) -> web.Response:
    return json_response(await ops.status(request.app[RUNTIME]))


async def status_html(request: web.Request) -> web.Response:
    response = web.Response(body=status_page(), content_type="text/html", charset="utf-8")
    # The page runs only its own inline script and talks only to this origin.
    response.headers["Content-Security-Policy"] = (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'")
    response.headers["Cache-Control"] = "no-store"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


ROUTES: list[tuple[str, str, Handler, Access]] = [
    ("GET", METRICS_PATH, get_metrics, "service"),  # "none" with FEEDSVC_METRICS_PUBLIC
    ("GET", "/v1/status", get_status, "service"),
    ("GET", "/status", status_html, "none"),
]

SCHEMA_TYPES = (ops.ServiceStatus,)


def openapi_paths(op: Any) -> dict[str, Any]:
    """These routes' part of the OpenAPI document (see ``feedsvc.api.recipients``)."""
    service: list[dict[str, list[str]]] = [{"serviceKey": []}]
    text = {"200": {"description": "the Prometheus text format", "content": {
        "text/plain": {"schema": {"type": "string"}}}}}
    html = {"200": {"description": "the status page", "content": {
        "text/html": {"schema": {"type": "string"}}}}}
    status = {"200": {"description": "OK", "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/ServiceStatus"}}}}}
    return {
        METRICS_PATH: {"get": op("Prometheus metrics of this process (no key needed with "
                                 "FEEDSVC_METRICS_PUBLIC=true)", service, text)},
        "/v1/status": {"get": op("Queues, rates, latencies, dead letters, backends and "
                                 "processes at a glance", service, status)},
        "/status": {"get": op("The status page (asks for the service key itself)", None,
                              html)},
    }


@contextlib.asynccontextmanager
async def metrics_server(rt: Runtime, host: str, port: int | None) -> AsyncIterator[None]:
    """``GET /metrics`` (and ``/healthz``) of a process without the API, a worker, on
    ``host:port`` while the block runs; nothing when ``port`` is None. The same rule as
    the API's: the service key unless ``FEEDSVC_METRICS_PUBLIC=true``. With ``--processes
    N`` each process listens on the port, and whichever answers adds up all of them."""
    if port is None:
        yield
        return

    async def serve_metrics(request: web.Request) -> web.Response:
        settings = rt.settings
        if not settings.metrics_public:
            try:
                principal = authenticate(request.headers.get("Authorization"),
                                         settings.service_keys, settings.jwt_secret,
                                         settings.jwt_max_ttl)
            except ClientError as exc:
                return error_response(exc.status, exc.code, exc.message,
                                      headers={"WWW-Authenticate": "Bearer"})
            if not principal.service:
                return error_response(403, "forbidden", "this route needs a service key")
        return await metrics.metrics_response(rt)

    async def healthz(request: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get(METRICS_PATH, serve_metrics)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        # With --processes N every worker process listens on the port (SO_REUSEPORT) and
        # any of them answers for all (multiprocess metrics).
        await web.TCPSite(runner, host, port,
                          reuse_port=bool(metrics.MULTIPROCESS_DIR) or None).start()
        log.info("metrics on http://%s:%d%s", host, port, METRICS_PATH)
        yield
    finally:
        await runner.cleanup()
