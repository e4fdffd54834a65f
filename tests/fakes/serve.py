"""Run one fake provider as its own process, for benchmarks and multi-process tests.

``python -m tests.fakes.serve fcm --port P --credentials PATH [--error-rate 0.2 ...]``
writes what the adapter needs (the FCM service-account JSON, the APNs .p8 key) and prints
``listening on URL`` on stderr once it accepts connections; ``GET {URL}/_fake/stats``
returns its ledger. Stops on SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

from tests.fakes.apns import FakeApns
from tests.fakes.fcm import FakeFcm
from tests.fakes.ledger import Behaviour
from tests.fakes.twilio import FakeTwilio


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.fakes.serve")
    parser.add_argument("provider", choices=["fcm", "apns", "twilio"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--credentials", type=Path,
                        help="write the FCM service-account JSON / APNs .p8 key here")
    parser.add_argument("--error-rate", type=float, default=0.0)
    parser.add_argument("--timeout-rate", type=float, default=0.0)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--retry-after", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    behaviour = Behaviour(error_rate=args.error_rate, timeout_rate=args.timeout_rate,
                          latency=args.latency, retry_after=args.retry_after, seed=args.seed)
    running: AbstractAsyncContextManager[Any]
    if args.provider == "fcm":
        fcm = FakeFcm(behaviour)
        running = fcm.running(args.host, args.port)
    elif args.provider == "apns":
        apns = FakeApns(behaviour)
        running = apns.running(args.host, args.port)
    else:
        running = FakeTwilio(behaviour).running(args.host, args.port)
    async with running as fake:
        if args.credentials is not None:
            if isinstance(fake, FakeFcm):
                fake.write_credentials(args.credentials)
            elif isinstance(fake, FakeApns):
                fake.write_key(args.credentials)
        print(f"listening on {fake.url}", file=sys.stderr, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> None:
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(parse(argv)))


if __name__ == "__main__":
    main()
