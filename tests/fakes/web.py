"""An aiohttp server on a free loopback port, for the HTTP/1.1 fakes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Self

from aiohttp import web

from tests.fakes.ledger import Behaviour, Ledger


class HttpFake:
    """Base of the aiohttp fakes: ``behaviour``, ``ledger``, ``url`` once running."""

    def __init__(self, behaviour: Behaviour | None = None) -> None:
        self.behaviour = behaviour or Behaviour()
        self.ledger = Ledger()
        self.url = ""

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def stats(self, request: web.Request) -> web.Response:
        """``GET /_fake/stats[?keys=1]``: the ledger, for a fake in another process."""
        return web.json_response(self.ledger.stats(keys=request.query.get("keys") == "1"))

    @asynccontextmanager
    async def running(self, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[Self]:
        app = web.Application(client_max_size=1024 * 1024)
        app.router.add_get("/_fake/stats", self.stats)
        self.routes(app)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
            server = site._server
            assert server is not None and server.sockets  # type: ignore[attr-defined]
            bound = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
            self.url = f"http://{host}:{bound}"
            yield self
        finally:
            await runner.cleanup()
