"""The service's status at a glance: what ``GET /v1/status``, the status page (``GET
/status``) and ``feedsvc status`` show.

Each feedsvc process (``api``, ``worker``, ``serve``) reports itself every
``REPORT_EVERY_S`` through the queue (``Queue.put_report``: a Redis hash, or a table of the
embedded queue file): who it is, which queues its consumers serve and how many are alive,
its totals since it started (events accepted, inbox reads, events fanned out, inbox rows
written, deliveries) and its recent rates and post → visible latencies, all read from its
own Prometheus metrics (``feedsvc.metrics``). ``status`` adds up the reports of the
processes heard from in the last ``FRESH_S`` seconds, the one answering included (its
figures taken live), and asks the queue and the store themselves for the rest: depth,
pending entries and the oldest entry's age per stream, dead letters, shed entries, and
whether Cassandra and Redis (or the embedded files) answer, and how fast.

Rates are over the last ``RATE_WINDOW_S`` seconds, latencies over the last
``LATENCY_WINDOW_S`` (p50 and p99 interpolated within the histogram's buckets, as
Prometheus' ``histogram_quantile`` does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from feedsvc import metrics
from feedsvc.clock import now_ms
from feedsvc.errors import RetryableError
from feedsvc.runtime import Runtime

log = logging.getLogger(__name__)

REPORT_EVERY_S = 2.0
FRESH_S = 15.0  # a process heard from this recently counts in the figures
SEEN_S = 300.0  # processes heard from this recently are listed
RATE_WINDOW_S = 10.0
LATENCY_WINDOW_S = 60.0
PING_TIMEOUT_S = 2.0
TOTALS = ("posts", "reads", "fanout_events", "inbox_rows", "tasks")


# --- the JSON of ``GET /v1/status`` -----------------------------------------------------


class StreamOut(msgspec.Struct):
    queue: str
    priority: str
    depth: int  # not yet acknowledged (pending included)
    pending: int  # handed to a consumer, not yet acknowledged
    oldest_age_s: float | None  # age of the oldest entry not yet acknowledged (lag)


class DependencyOut(msgspec.Struct):
    name: str  # cassandra, redis, sqlite, sqlite_queue
    ok: bool
    latency_ms: float | None
    error: str | None = None


class ProcessOut(msgspec.Struct):
    id: str
    role: str  # api, worker, serve (API and workers in one process)
    host: str
    pid: int
    seen_s_ago: float
    uptime_s: float
    consumers: int  # consumers this process runs
    consumers_alive: int  # of them, those that looped in the last minute
    queues: list[str]
    fanout_events: int  # since the process started
    tasks: int  # queue entries finished since the process started


class FiguresOut(msgspec.Struct):
    posts: float  # events accepted (202)
    reads: float  # inbox pages read (200)
    fanout_events: float
    inbox_rows: float
    tasks: float  # queue entries finished by workers


class LatencyOut(msgspec.Struct):
    p50_s: float | None  # None: no event became visible in the window
    p99_s: float | None
    samples: int
    window_s: float


class DeliveryOut(msgspec.Struct):
    channel: str
    provider: str
    outcome: str
    total: int
    per_s: float


class BreakerOut(msgspec.Struct):
    """A provider's circuit breakers: how many processes have theirs in each state."""

    provider: str
    closed: int
    open: int
    half_open: int


class ServiceStatus(msgspec.Struct):
    """``GET /v1/status``: the whole service as the processes and the backends report it."""

    generated_at: int  # epoch ms
    backend: str  # cassandra+redis or embedded
    streams: list[StreamOut]
    dead_letters: int  # kept now
    shed: int  # low entries shed since the queue was created
    scheduled: int  # delivery retries waiting for their time
    totals: FiguresOut  # since each running process started, added up
    rates: FiguresOut  # per second, over the last RATE_WINDOW_S
    post_to_visible: LatencyOut
    dependencies: list[DependencyOut]
    processes: list[ProcessOut]
    deliveries: list[DeliveryOut]
    breakers: list[BreakerOut]


# --- one process's report ---------------------------------------------------------------


class ProcessReport(msgspec.Struct):
    id: str
    role: str
    host: str
    pid: int
    started_at: int  # epoch ms
    consumers: int
    consumers_alive: int
    queues: list[str]
    totals: dict[str, float]
    rates: dict[str, float]
    deliveries: list[tuple[str, str, str, float, float]]  # channel, provider, outcome, n, /s
    bounds: list[float]  # the latency histogram's upper bounds (+Inf implied)
    window: list[float]  # events per bucket over the latency window (len(bounds) + 1)
    window_s: float
    breakers: list[tuple[str, str]] = []  # (provider, state) of this process's breakers


_report_decoder = msgspec.msgpack.Decoder(ProcessReport)


@dataclass(frozen=True)
class _Sample:
    at: float  # monotonic
    totals: dict[str, float]
    deliveries: dict[tuple[str, str, str], float]
    buckets: list[float]


def _sample() -> _Sample:
    deliveries = {(labels["channel"], labels["provider"], labels["outcome"]): value
                  for name, labels, value in metrics.samples(metrics.DELIVERIES)
                  if name.endswith("_total")}
    return _Sample(
        time.monotonic(),
        {"posts": metrics.total(metrics.HTTP_REQUESTS, route="/v1/events", method="POST",
                                status="202"),
         "reads": metrics.total(metrics.HTTP_REQUESTS, route="/v1/inbox", method="GET",
                                status="200"),
         "fanout_events": metrics.total(metrics.FANOUT_EVENTS),
         "inbox_rows": metrics.total(metrics.INBOX_ROWS),
         "tasks": metrics.total(metrics.WORKER_TASKS)},
        deliveries, metrics.histogram_buckets(metrics.POST_TO_VISIBLE))


class Reporter:
    """This process's figures, sampled at most once a second, kept for the longest window."""

    def __init__(self) -> None:
        self.id = f"{socket.gethostname()}-{os.getpid()}"
        self.role = "api"
        self.queues: list[str] = []
        self.started_at = now_ms()
        self.history: deque[_Sample] = deque()

    def _sampled(self) -> _Sample:
        """The figures now; kept in the history at most once a second."""
        latest = _sample()
        if not self.history or latest.at - self.history[-1].at >= 1.0:
            self.history.append(latest)
        while len(self.history) > 2 and latest.at - self.history[1].at > LATENCY_WINDOW_S:
            self.history.popleft()
        return latest

    def _since(self, seconds: float) -> _Sample:
        """The oldest sample at most ``seconds`` old (or the oldest there is)."""
        now = time.monotonic()
        for sample in self.history:
            if now - sample.at <= seconds + 0.5:
                return sample
        return self.history[0]

    def report(self, rt: Runtime) -> ProcessReport:
        latest = self._sampled()
        base = self._since(RATE_WINDOW_S)
        span = latest.at - base.at
        rates = {k: (latest.totals[k] - base.totals[k]) / span if span > 0 else 0.0
                 for k in TOTALS}
        deliveries = [(ch, prov, out, n,
                       (n - base.deliveries.get((ch, prov, out), 0.0)) / span if span > 0
                       else 0.0)
                      for (ch, prov, out), n in sorted(latest.deliveries.items()) if n]
        old = self._since(LATENCY_WINDOW_S)
        window = [b - a for a, b in zip(old.buckets, latest.buckets, strict=True)]
        beats = rt.health.beats
        alive = sum(1 for t in beats.values() if time.monotonic() - t < 60.0)
        return ProcessReport(
            self.id, self.role, socket.gethostname(), os.getpid(), self.started_at,
            rt.health.expected, min(alive, rt.health.expected), list(self.queues),
            latest.totals, rates, deliveries, list(metrics.VISIBLE_BUCKETS), window,
            latest.at - old.at,
            [(name, b.state) for name, b in rt.breakers.statistics().items()])


REPORTER = Reporter()


@contextlib.asynccontextmanager
async def reporting(rt: Runtime, role: str, queues: Sequence[str] = ()) -> AsyncIterator[None]:
    """Report this process every ``REPORT_EVERY_S`` while the block runs; forget it after
    (a process that dies is forgotten by the status once silent for ``FRESH_S``)."""
    REPORTER.role = role
    REPORTER.queues = list(queues)

    async def loop() -> None:
        failing = False
        while True:
            metrics.observe_runtime(rt)  # read caches, breakers, CPU (multiprocess mode)
            try:
                await rt.queue.put_report(REPORTER.id,
                                          msgspec.msgpack.encode(REPORTER.report(rt)))
                failing = False
            except RetryableError as exc:
                if not failing:
                    log.debug("process report not written: %s", exc)
                failing = True
            await asyncio.sleep(REPORT_EVERY_S)

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        with contextlib.suppress(RetryableError, TimeoutError):
            await asyncio.wait_for(rt.queue.drop_report(REPORTER.id), PING_TIMEOUT_S)
        metrics.process_ended()


# --- the whole service ------------------------------------------------------------------


def quantile(q: float, bounds: Sequence[float], counts: Sequence[float]) -> float | None:
    """The ``q`` quantile of a histogram (``counts`` per bucket, +Inf last), linear within
    the bucket it falls in; None for an empty histogram."""
    seen = sum(counts)
    if seen <= 0:
        return None
    rank = q * seen
    below = 0.0
    for i, count in enumerate(counts):
        if below + count >= rank and count > 0:
            if i >= len(bounds):  # the +Inf bucket: the highest bound is all we know
                return float(bounds[-1])
            lower = bounds[i - 1] if i > 0 else 0.0
            return float(lower + (bounds[i] - lower) * (rank - below) / count)
        below += count
    return float(bounds[-1])


async def _ping(name: str, ping: Any) -> DependencyOut:
    start = time.perf_counter()
    try:
        await asyncio.wait_for(ping(), PING_TIMEOUT_S)
    except (RetryableError, TimeoutError) as exc:
        return DependencyOut(name, False, None, str(exc) or "no answer in time")
    return DependencyOut(name, True, round((time.perf_counter() - start) * 1000, 3))


async def status(rt: Runtime, *, own: bool = True) -> ServiceStatus:
    """Everything ``ServiceStatus`` holds, with this process's own figures (``own``; not
    for ``feedsvc status``, which serves nothing); a backend that does not answer shows as
    such (its figures empty), never as an error."""
    store_name, queue_name = metrics.backend_names(rt)
    now = now_ms()
    reports: dict[str, tuple[int, ProcessReport]] = {}
    streams: list[StreamOut] = []
    dead = shed = scheduled = 0
    dependencies = list(await asyncio.gather(_ping(store_name, rt.store.ping),
                                             _ping(queue_name, rt.queue.ping)))
    try:
        for stamp, body in await rt.queue.reports(SEEN_S):
            with contextlib.suppress(msgspec.DecodeError):
                report = _report_decoder.decode(body)
                reports[report.id] = (stamp, report)
        for stream in await rt.queue.stream_stats():
            age = None if stream.oldest_ms is None else max(0.0, (now - stream.oldest_ms) / 1000)
            streams.append(StreamOut(stream.queue, stream.priority, stream.depth,
                                     stream.pending, age))
        stats = await rt.queue.stats()
        dead, shed, scheduled = stats.dead_letters, stats.shed, stats.scheduled
    except RetryableError as exc:
        log.debug("status: queue figures missing: %s", exc)
    if own:
        mine = REPORTER.report(rt)
        reports[mine.id] = (now, mine)  # this process's own figures are the live ones
    fresh = [r for stamp, r in reports.values() if now - stamp <= FRESH_S * 1000]
    totals = {k: sum(r.totals.get(k, 0.0) for r in fresh) for k in TOTALS}
    rates = {k: round(sum(r.rates.get(k, 0.0) for r in fresh), 3) for k in TOTALS}
    window = [0.0] * (len(metrics.VISIBLE_BUCKETS) + 1)
    for r in fresh:
        if r.bounds == list(metrics.VISIBLE_BUCKETS) and len(r.window) == len(window):
            window = [a + b for a, b in zip(window, r.window, strict=True)]
    deliveries: dict[tuple[str, str, str], list[float]] = {}
    for r in fresh:
        for channel, provider, outcome, n, per_s in r.deliveries:
            figure = deliveries.setdefault((channel, provider, outcome), [0.0, 0.0])
            figure[0] += n
            figure[1] += per_s
    breakers: dict[str, dict[str, int]] = {}
    for r in fresh:
        for provider, state in r.breakers:
            counts = breakers.setdefault(provider, {"closed": 0, "open": 0, "half_open": 0})
            counts[state] = counts.get(state, 0) + 1
    processes = [
        ProcessOut(r.id, r.role, r.host, r.pid, round((now - stamp) / 1000, 1),
                   round((now - r.started_at) / 1000, 1), r.consumers, r.consumers_alive,
                   r.queues, int(r.totals.get("fanout_events", 0)), int(r.totals.get("tasks", 0)))
        for stamp, r in sorted(reports.values(), key=lambda sr: (sr[1].role, sr[1].id))]
    return ServiceStatus(
        generated_at=now,
        backend="embedded" if rt.settings.embedded else "cassandra+redis",
        streams=streams, dead_letters=dead, shed=shed, scheduled=scheduled,
        totals=FiguresOut(**totals), rates=FiguresOut(**rates),
        post_to_visible=LatencyOut(
            _rounded(quantile(0.5, metrics.VISIBLE_BUCKETS, window)),
            _rounded(quantile(0.99, metrics.VISIBLE_BUCKETS, window)),
            int(sum(window)), LATENCY_WINDOW_S),
        dependencies=dependencies, processes=processes,
        deliveries=[DeliveryOut(c, p, o, int(n), round(per_s, 3))
                    for (c, p, o), (n, per_s) in sorted(deliveries.items())],
        breakers=[BreakerOut(provider, c["closed"], c["open"], c["half_open"])
                  for provider, c in sorted(breakers.items())])


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
