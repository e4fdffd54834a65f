"""The fake FCM's own ceiling: how many sends per second it accepts from a bare client.

The delivery benchmark divides feedsvc's end-to-end deliveries per second by this number,
measured in the same run against the same fake: a bare ``aiohttp`` client (the library the
FCM adapter uses, HTTP/1.1 keep-alive, one pooled session) sending the same ``messages:send``
requests (same body shape, a bearer token fetched once, a distinct ``Idempotency-Key`` per
request) with the same number in flight, and nothing else — no queue, no claims, no log.

* ``measure_fcm_ceiling(url, project, token, requests=, concurrency=)`` measures a running
  fake (``fetch_access_token`` gets the token from its ``token_uri``).
* ``measure_fcm_adapter(url, credentials, ...)`` sends the same through ``FcmProvider``.
* ``run_fake_fcm(credentials)`` starts ``python -m tests.fakes.serve fcm`` as its own process
  (so the fake and the client do not share an event loop) and yields its URL.
* ``python -m loadtest.fake_ceiling [--requests N] [--concurrency C] [--client httpx|adapter]``
  does both and prints
  one JSON document. Loopback only, bounded in requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from feedsvc.delivery.providers.base import Outgoing
from feedsvc.delivery.providers.fcm import AccessTokens, FcmProvider, ServiceAccount
from feedsvc.delivery.providers.http import open_client
from feedsvc.errors import FeedError

LISTENING = re.compile(r"listening on (http://\S+)")


@dataclass(frozen=True)
class Ceiling:
    requests: int
    concurrency: int
    seconds: float
    per_second: float
    errors: int  # non-200 answers and transport errors (a healthy fake gives 0)


async def fetch_access_token(credentials: Path) -> str:
    """One access token from the service account's token_uri (outside any timing)."""
    client = open_client(30.0)
    try:
        return await AccessTokens(ServiceAccount.from_file(credentials), client).get()
    finally:
        await client.aclose()


async def measure_fcm_ceiling(url: str, project: str, token: str, *, requests: int = 5000,
                              concurrency: int = 64, client: str = "aiohttp") -> Ceiling:
    """Send ``requests`` messages with ``concurrency`` in flight; sends per second.
    ``client`` is ``aiohttp`` (the library the FCM adapter uses) or ``httpx`` (to compare:
    its connection pool costs CPU per request in proportion to the connections open)."""
    endpoint = f"{url.rstrip('/')}/v1/projects/{project}/messages:send"
    run = uuid.uuid4().hex[:8]
    errors = 0
    next_index = 0

    def request(i: int) -> tuple[dict[str, Any], dict[str, str]]:
        body = {"message": {"token": f"ceiling-{i % 3000}",
                            "notification": {"title": "Ceiling", "body": f"message {i}"},
                            "data": {"notification_id": f"ceiling:{i}", "event_id": run}}}
        return body, {"Authorization": f"Bearer {token}",
                      "Idempotency-Key": f"ceiling:{run}:{i}:push:d"}

    async def post(send: Callable[[dict[str, Any], dict[str, str]], Awaitable[int]]) -> None:
        nonlocal errors, next_index
        while next_index < requests:
            i = next_index
            next_index += 1
            try:
                errors += await send(*request(i)) != 200
            except (httpx.HTTPError, aiohttp.ClientError):
                errors += 1

    started = 0.0
    if client == "aiohttp":
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:
            async def send_aiohttp(body: dict[str, Any], headers: dict[str, str]) -> int:
                async with session.post(endpoint, json=body, headers=headers) as response:
                    await response.read()
                    return response.status

            await _warm(lambda: session.get(f"{url.rstrip('/')}/_fake/stats"), concurrency)
            started = time.perf_counter()
            await asyncio.gather(*(post(send_aiohttp) for _ in range(concurrency)))
    else:
        limits = httpx.Limits(max_connections=concurrency,
                              max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(limits=limits, timeout=30.0, trust_env=False) as http:
            async def send_httpx(body: dict[str, Any], headers: dict[str, str]) -> int:
                return (await http.post(endpoint, json=body, headers=headers)).status_code

            await asyncio.gather(*(http.get(f"{url.rstrip('/')}/_fake/stats")
                                   for _ in range(concurrency)))
            started = time.perf_counter()
            await asyncio.gather(*(post(send_httpx) for _ in range(concurrency)))
    seconds = time.perf_counter() - started
    return Ceiling(requests, concurrency, round(seconds, 3), round(requests / seconds, 1),
                   errors)


async def _warm(get: Callable[[], Any], concurrency: int) -> None:
    """Open the pool's connections first so their set-up is not charged to the fake."""
    async def one() -> None:
        async with get() as response:
            await response.read()

    await asyncio.gather(*(one() for _ in range(concurrency)))


async def measure_fcm_adapter(url: str, credentials: Path, *, requests: int = 5000,
                              concurrency: int = 64) -> Ceiling:
    """The same sends through feedsvc's ``FcmProvider`` (token cache, error sorting, its
    shared client): what the adapter alone costs against the bare client's ceiling."""
    account = ServiceAccount.from_file(credentials)
    project = account.project_id or ""
    client = open_client(30.0)
    provider = FcmProvider(project, account, client, url)
    run = uuid.uuid4().hex[:8]
    errors = 0
    next_index = 0

    async def sender() -> None:
        nonlocal errors, next_index
        while next_index < requests:
            i = next_index
            next_index += 1
            message = Outgoing(key=f"adapter:{run}:{i}:push:d", kind="fcm",
                               address=f"ceiling-{i % 3000}", title="Ceiling",
                               body=f"message {i}",
                               data={"notification_id": f"adapter:{i}", "event_id": run})
            try:
                await provider.send(message)
            except FeedError:
                errors += 1

    try:
        await provider.tokens.get()  # the token fetch is not timed
        await _warm(lambda: client._open().get(f"{url.rstrip('/')}/_fake/stats"), concurrency)
        started = time.perf_counter()
        await asyncio.gather(*(sender() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    finally:
        await client.aclose()
    return Ceiling(requests, concurrency, round(seconds, 3), round(requests / seconds, 1),
                   errors)


@contextmanager
def run_fake_fcm(credentials: Path, *, extra: Sequence[str] = ()) -> Iterator[str]:
    """Start the fake FCM in its own process; yields its URL; stops it after. Its stderr
    goes to a file beside the credentials (a pipe nobody reads could fill and stall it)."""
    log_path = credentials.with_suffix(".log")
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.fakes.serve", "fcm", "--credentials",
             str(credentials), *extra], stderr=log, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        url = None
        while url is None and time.monotonic() < deadline and process.poll() is None:
            match = LISTENING.search(log_path.read_text())
            url = match.group(1) if match else None
            if url is None:
                time.sleep(0.05)
        if url is None:
            raise RuntimeError(f"the fake FCM did not start: {log_path.read_text()[-2000:]}")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.fake_ceiling")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--client", choices=["aiohttp", "httpx", "adapter"], default="aiohttp",
                        help="adapter: the same sends through feedsvc's FcmProvider")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        credentials = Path(tmp) / "fcm.json"
        with run_fake_fcm(credentials) as url:
            project = json.loads(credentials.read_text())["project_id"]
            if args.client == "adapter":
                ceiling = asyncio.run(measure_fcm_adapter(
                    url, credentials, requests=args.requests, concurrency=args.concurrency))
            else:
                token = asyncio.run(fetch_access_token(credentials))
                ceiling = asyncio.run(measure_fcm_ceiling(
                    url, project, token, requests=args.requests,
                    concurrency=args.concurrency, client=args.client))
    print(json.dumps(asdict(ceiling), indent=2))


if __name__ == "__main__":
    main()
