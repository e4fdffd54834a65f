"""A no-op aiohttp server: the ceiling for any aiohttp handler on this machine.

``python -m loadtest.noop_server --port P [--host 127.0.0.1]`` serves ``GET /noop`` -> 200
``{}`` (JSON) and nothing else, set up the way feedsvc serves its API (``web.AppRunner`` with
``access_log=None`` and a ``web.TCPSite``, default asyncio event loop) so the difference between
the two is feedsvc's own work. Prints ``listening on http://HOST:PORT`` on stderr once it
accepts connections; stops cleanly on SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Sequence

from aiohttp import web


async def noop(request: web.Request) -> web.Response:
    return web.json_response({})


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/noop", noop)
    return app


async def serve(host: str, port: int) -> None:
    """Serve until cancelled."""
    runner = web.AppRunner(make_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    print(f"listening on http://{host}:{port}", file=sys.stderr, flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.noop_server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)

    async def until_signalled() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(serve(args.host, args.port))
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(until_signalled())
    return 0


if __name__ == "__main__":
    sys.exit(main())
