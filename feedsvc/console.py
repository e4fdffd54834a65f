"""``feedsvc status``: the status page's figures in the terminal (rich), once or, with
``--watch``, refreshed every ``--interval`` seconds until Ctrl-C.

The figures come from the backends directly (``feedsvc.ops.status`` on a runtime opened with
the usual ``FEEDSVC_*`` settings), or with ``--url`` from a running API's ``GET /v1/status``
(with ``--key``, else the first of ``FEEDSVC_SERVICE_KEYS``). ``--json`` prints the JSON, one
object per line.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

import aiohttp
import msgspec
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from feedsvc.config import Settings
from feedsvc.errors import ConfigError, FeedError
from feedsvc.ops import ServiceStatus


def _seconds(value: float | None) -> str:
    if value is None:
        return "—"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.1f} s"
    return f"{value / 60:.1f} min"


def _rate(value: float) -> str:
    return f"{value:,.1f}/s"


def render(status: ServiceStatus) -> RenderableType:
    """The figures as rich tables: overview, streams, backends, processes, deliveries."""
    when = datetime.fromtimestamp(status.generated_at / 1000, UTC).strftime("%H:%M:%S UTC")
    overview = Table(title=f"feedsvc ({status.backend}) at {when}", box=box.SIMPLE_HEAVY,
                     show_header=True, title_justify="left")
    for column in ("figure", "total", "now"):
        overview.add_column(column, justify="right" if column != "figure" else "left")
    lat = status.post_to_visible
    rows = [
        ("events accepted", f"{status.totals.posts:,.0f}", _rate(status.rates.posts)),
        ("inbox reads", f"{status.totals.reads:,.0f}", _rate(status.rates.reads)),
        ("events fanned out", f"{status.totals.fanout_events:,.0f}",
         _rate(status.rates.fanout_events)),
        ("inbox rows written", f"{status.totals.inbox_rows:,.0f}",
         _rate(status.rates.inbox_rows)),
        ("post → visible p50", "", _seconds(lat.p50_s)),
        ("post → visible p99", "", _seconds(lat.p99_s)),
        ("dead letters", f"{status.dead_letters:,}", ""),
        ("shed", f"{status.shed:,}", ""),
        ("scheduled retries", f"{status.scheduled:,}", ""),
    ]
    for row in rows:
        overview.add_row(*row)

    streams = Table(title="queues", box=box.SIMPLE, title_justify="left")
    for column in ("queue", "priority", "depth", "pending", "oldest"):
        streams.add_column(column, justify="right" if column in ("depth", "pending",
                                                                  "oldest") else "left")
    for s in status.streams:
        if s.depth or s.queue == "fanout":
            streams.add_row(s.queue, s.priority, f"{s.depth:,}", f"{s.pending:,}",
                            _seconds(s.oldest_age_s))

    backends = Table(title="backends", box=box.SIMPLE, title_justify="left")
    for column in ("backend", "state", "ping"):
        backends.add_column(column)
    for d in status.dependencies:
        state = Text("up", style="green") if d.ok else Text(f"DOWN {d.error or ''}",
                                                            style="bold red")
        backends.add_row(d.name, state, "" if d.latency_ms is None else f"{d.latency_ms:.1f} ms")

    processes = Table(title="processes seen recently", box=box.SIMPLE, title_justify="left")
    for column in ("process", "role", "queues", "consumers", "seen", "up", "tasks"):
        processes.add_column(column)
    for p in status.processes:
        seen = Text(f"{p.seen_s_ago:.0f} s ago",
                    style="red" if p.seen_s_ago > 15 else "")
        processes.add_row(p.id, p.role, ",".join(p.queues) or "—",
                          f"{p.consumers_alive}/{p.consumers}", seen, _seconds(p.uptime_s),
                          f"{p.tasks:,}")

    parts: list[RenderableType] = [overview, streams, backends, processes]
    if status.breakers:
        breakers = Table(title="provider breakers (processes in each state)", box=box.SIMPLE,
                         title_justify="left")
        for column in ("provider", "closed", "open", "half open"):
            breakers.add_column(column)
        for b in status.breakers:
            breakers.add_row(b.provider, str(b.closed),
                             Text(str(b.open), style="bold red" if b.open else ""),
                             str(b.half_open))
        parts.append(breakers)
    if status.deliveries:
        deliveries = Table(title="deliveries", box=box.SIMPLE, title_justify="left")
        for column in ("channel", "provider", "outcome", "total", "now"):
            deliveries.add_column(column)
        for out in status.deliveries:
            deliveries.add_row(out.channel, out.provider, out.outcome, f"{out.total:,}",
                               _rate(out.per_s))
        parts.append(deliveries)
    return Group(*parts)


_decoder = msgspec.json.Decoder(ServiceStatus)


@contextlib.asynccontextmanager
async def _source(settings: Settings, url: str | None,
                  key: str | None) -> AsyncIterator[Callable[[], Awaitable[ServiceStatus]]]:
    """A function that fetches the status, from the API at ``url`` or from the backends."""
    if url is None:
        from feedsvc.ops import status
        from feedsvc.runtime import open_runtime

        async with open_runtime(settings) as rt:
            yield lambda: status(rt, own=False)
        return
    credential = key or (settings.service_keys[0] if settings.service_keys else None)
    if credential is None:
        raise ConfigError("feedsvc status --url needs --key or FEEDSVC_SERVICE_KEYS")
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {credential}"},
                                     timeout=aiohttp.ClientTimeout(total=10)) as session:
        async def fetch() -> ServiceStatus:
            try:
                async with session.get(f"{url.rstrip('/')}/v1/status") as response:
                    body = await response.read()
                    if response.status != 200:
                        raise FeedError(f"{url}: {response.status} {body[:200]!r}")
            except aiohttp.ClientError as exc:
                raise FeedError(f"{url}: {exc}") from exc
            return _decoder.decode(body)

        yield fetch


async def run(settings: Settings, *, url: str | None = None, key: str | None = None,
              watch: bool = False, interval: float = 2.0, as_json: bool = False,
              console: Console | None = None) -> int:
    console = console or Console()
    async with _source(settings, url, key) as fetch:
        if as_json:  # one JSON object per line, once or every interval
            while True:
                print(msgspec.json.encode(await fetch()).decode(), flush=True)
                if not watch:
                    return 0
                await asyncio.sleep(interval)
        if not watch:
            console.print(render(await fetch()))
            return 0
        with Live(render(await fetch()), console=console, refresh_per_second=4,
                  screen=False) as live:
            while True:
                await asyncio.sleep(interval)
                live.update(render(await fetch()))
