"""Prometheus metrics: the process's registry, every metric feedsvc exposes, and what feeds
them. ``GET /metrics`` on the API and ``feedsvc worker --metrics-port N`` serve it.

Names follow Prometheus' conventions (``feedsvc_`` prefix, ``_total`` counters, base units):

- ``feedsvc_http_requests_total{route,method,status}`` and
  ``feedsvc_http_request_duration_seconds{route,method}``: every API request
  (``http_middleware``), ``route`` being the route's template (``/v1/users/{user_id}``).
- ``feedsvc_queue_depth``, ``feedsvc_queue_pending``, ``feedsvc_queue_oldest_age_seconds``
  ``{queue,priority}``; ``feedsvc_queue_scheduled``, ``feedsvc_dead_letters_stored``,
  ``feedsvc_queue_shed_count``; ``feedsvc_backend_up{backend}``: read from the queue and
  pinged at scrape time (``refresh``). They describe the shared queue, so every process
  reports the same values: aggregate them with ``max``, not ``sum``.
- ``feedsvc_fanout_events_total{route}``, ``feedsvc_inbox_rows_written_total``,
  ``feedsvc_post_to_visible_seconds`` (from the event's ``accepted_at`` to its fan-out
  written), ``feedsvc_worker_tasks_total{queue,outcome}``.
- ``feedsvc_dead_letters_total{queue,reason}``, ``feedsvc_shed_events_total{queue,priority}``:
  counted by the process that wrote them.
- ``feedsvc_backend_request_duration_seconds{backend,op}`` and
  ``feedsvc_backend_request_errors_total{backend,op}``: every call of the store and queue
  adapters (``cassandra``, ``redis``, and the embedded ``sqlite`` and ``sqlite_queue``), timed
  at the adapter's boundary by one class decorator (``instrumented``); ``op`` is the port's
  method (``claim`` includes the time a consumer waits for work).
- ``feedsvc_deliveries_total{channel,provider,outcome}``: notification deliveries
  (``outcome``: sent, suppressed, unavailable, dead_target, rejected, render_error, error).
- ``process_*`` and ``python_*``: CPU, memory and the garbage collector of the process.

Series with known label values are created at zero, so a dashboard's queries find them
before the first event.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import itertools
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from feedsvc import logs
from feedsvc.errors import (
    ClientError,
    DeadTarget,
    ProviderRejected,
    ProviderUnavailable,
    RenderError,
    RetryableError,
)

if TYPE_CHECKING:
    from feedsvc.runtime import Runtime

disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series: they double every counter's series

# Set (by ``feedsvc.multiproc``) when ``--processes N`` runs several processes: values are
# kept in files there and a scrape adds up every process's.
MULTIPROCESS_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
REGISTRY = CollectorRegistry(auto_describe=True)
if not MULTIPROCESS_DIR:  # these read the process itself: one process's, never a sum
    ProcessCollector(registry=REGISTRY)
    PlatformCollector(registry=REGISTRY)
    GCCollector(registry=REGISTRY)

QUEUES = ("fanout", "push", "sms", "email")
PRIORITIES = ("high", "medium", "low")
DEAD_LETTER_REASONS = ("poison", "shed", "exhausted", "rejected", "render_error")
DELIVERY_PROVIDERS = {"push": ("fcm", "apns", "webpush"), "sms": ("sms",), "email": ("email",)}
DELIVERY_OUTCOMES = ("sent", "suppressed", "unavailable", "dead_target", "rejected",
                     "render_error", "error")
# Seconds from accepted to written in every inbox: a quiet system is in the first buckets, a
# backlog in the last ones.
VISIBLE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                   60.0, 120.0, 300.0, 600.0, 1800.0)
BACKEND_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)

HTTP_REQUESTS = Counter("feedsvc_http_requests", "HTTP requests answered",
                        ["route", "method", "status"], registry=REGISTRY)
HTTP_LATENCY = Histogram("feedsvc_http_request_duration_seconds",
                         "Time to answer an HTTP request", ["route", "method"],
                         registry=REGISTRY)
QUEUE_DEPTH = Gauge("feedsvc_queue_depth", "Entries in a stream not yet acknowledged "
                    "(pending ones included; scheduled retries not)", ["queue", "priority"],
                    registry=REGISTRY, multiprocess_mode="mostrecent")
QUEUE_PENDING = Gauge("feedsvc_queue_pending", "Entries handed to a consumer and not yet "
                      "acknowledged", ["queue", "priority"], registry=REGISTRY,
                      multiprocess_mode="mostrecent")
QUEUE_OLDEST = Gauge("feedsvc_queue_oldest_age_seconds", "Age of the oldest entry not yet "
                     "acknowledged (0 when the stream is empty)", ["queue", "priority"],
                     registry=REGISTRY, multiprocess_mode="mostrecent")
QUEUE_SCHEDULED = Gauge("feedsvc_queue_scheduled", "Delivery retries waiting for their time",
                        registry=REGISTRY, multiprocess_mode="mostrecent")
DEAD_LETTERS_STORED = Gauge("feedsvc_dead_letters_stored", "Dead letters kept now, all queues",
                            registry=REGISTRY, multiprocess_mode="mostrecent")
QUEUE_SHED = Gauge("feedsvc_queue_shed_count", "Low-priority entries shed, as the queue "
                   "counts them (all processes, since the queue was created)",
                   registry=REGISTRY, multiprocess_mode="mostrecent")
BACKEND_UP = Gauge("feedsvc_backend_up", "1 when the store or queue answered the scrape's "
                   "ping", ["backend"], registry=REGISTRY, multiprocess_mode="mostrecent")
FANOUT_EVENTS = Counter("feedsvc_fanout_events", "Events fanned out (written to every "
                        "inbox of their audience)", ["route"], registry=REGISTRY)
INBOX_ROWS = Counter("feedsvc_inbox_rows_written", "Inbox rows written by fan-out and "
                     "backfill", registry=REGISTRY)
POST_TO_VISIBLE = Histogram("feedsvc_post_to_visible_seconds", "From an event's accepted_at "
                            "to its fan-out written", buckets=VISIBLE_BUCKETS,
                            registry=REGISTRY)
WORKER_TASKS = Counter("feedsvc_worker_tasks", "Queue entries a worker finished",
                       ["queue", "outcome"], registry=REGISTRY)
DEAD_LETTERS = Counter("feedsvc_dead_letters", "Dead letters written", ["queue", "reason"],
                       registry=REGISTRY)
SHED = Counter("feedsvc_shed_events", "Low-priority entries shed (older than "
               "FEEDSVC_LOW_MAX_AGE)", ["queue", "priority"], registry=REGISTRY)
BACKEND_LATENCY = Histogram("feedsvc_backend_request_duration_seconds", "Time of one call "
                            "of the store or queue adapter", ["backend", "op"],
                            buckets=BACKEND_BUCKETS, registry=REGISTRY)
BACKEND_ERRORS = Counter("feedsvc_backend_request_errors", "Calls of the store or queue "
                         "adapter that failed", ["backend", "op"], registry=REGISTRY)
DELIVERIES = Counter("feedsvc_deliveries", "Notification deliveries by outcome",
                     ["channel", "provider", "outcome"], registry=REGISTRY)
BREAKER_STATE = Gauge("feedsvc_breaker_state", "1 for the state a provider's circuit breaker "
                      "is in (this process's breaker)", ["provider", "state"],
                      registry=REGISTRY, multiprocess_mode="liveall")
BREAKER_REJECTED = Counter("feedsvc_breaker_rejected", "Provider calls failed fast by an open "
                           "breaker", ["provider"], registry=REGISTRY)
BREAKER_TRANSITIONS = Counter("feedsvc_breaker_transitions", "Breaker state changes",
                              ["provider"], registry=REGISTRY)
READ_CACHE = Counter("feedsvc_read_cache_lookups", "Read-path cache lookups: celebrity heads "
                     "and following lists (feedsvc/readcache.py)", ["cache", "result"],
                     registry=REGISTRY)
READ_CACHE_ENTRIES = Gauge("feedsvc_read_cache_entries", "Entries the read caches hold",
                           ["cache"], registry=REGISTRY, multiprocess_mode="livesum")
PROCESS_CPU = Gauge("feedsvc_process_cpu_seconds", "CPU time this feedsvc process used",
                    registry=REGISTRY, multiprocess_mode="liveall")
PROCESS_MEMORY = Gauge("feedsvc_process_resident_memory_bytes", "Resident memory of this "
                       "feedsvc process", registry=REGISTRY, multiprocess_mode="liveall")
BREAKER_STATES = ("closed", "open", "half_open")
# The read caches' counters (``ReadStatistics``) as (cache, result) of the lookups metric.
_READ_COUNTS = {"head_hits": ("head", "hit"), "head_misses": ("head", "miss"),
                "following_hits": ("following", "hit"),
                "following_misses": ("following", "miss"),
                "following_bypassed": ("following", "bypassed")}


def _zeros() -> None:
    for queue in QUEUES:
        WORKER_TASKS.labels(queue, "done")
        WORKER_TASKS.labels(queue, "dead_letter")
        for reason in DEAD_LETTER_REASONS:
            DEAD_LETTERS.labels(queue, reason)
        for priority in PRIORITIES:
            SHED.labels(queue, priority)
            for gauge in (QUEUE_DEPTH, QUEUE_PENDING, QUEUE_OLDEST):
                gauge.labels(queue, priority)
    for route in ("push", "pull", "direct"):
        FANOUT_EVENTS.labels(route)
    for channel, providers in DELIVERY_PROVIDERS.items():
        for provider in providers:
            BREAKER_REJECTED.labels(provider)
            for state in BREAKER_STATES:  # a breaker not made yet is closed
                BREAKER_STATE.labels(provider, state).set(1 if state == "closed" else 0)
            BREAKER_TRANSITIONS.labels(provider)
            for outcome in DELIVERY_OUTCOMES:
                DELIVERIES.labels(channel, provider, outcome)
    for cache, result in _READ_COUNTS.values():
        READ_CACHE.labels(cache, result)
    for cache in ("head", "following"):
        READ_CACHE_ENTRIES.labels(cache)


_zeros()


# --- what the code calls ------------------------------------------------------------------


def fanned_out(route: str, rows: int, accepted_at_ms: int, now_ms: int) -> None:
    """An event's fan-out is written: ``rows`` inbox rows, ``now_ms - accepted_at_ms``
    after intake accepted it."""
    FANOUT_EVENTS.labels(route).inc()
    INBOX_ROWS.inc(rows)
    POST_TO_VISIBLE.observe(max(0.0, (now_ms - accepted_at_ms) / 1000))


def rows_written(rows: int) -> None:
    INBOX_ROWS.inc(rows)


def task_finished(queue: str, outcome: str) -> None:
    WORKER_TASKS.labels(queue, outcome).inc()


def dead_lettered(queue: str, reason: str) -> None:
    DEAD_LETTERS.labels(queue, reason).inc()


def shed(queue: str, priority: str) -> None:
    SHED.labels(queue, priority).inc()


def delivered(channel: str, provider: str, outcome: str) -> None:
    """One delivery's outcome (``feedsvc/delivery/send.py``)."""
    DELIVERIES.labels(channel, provider, outcome).inc()


def delivery_failed(channel: str, provider: str, exc: BaseException) -> None:
    """A failed provider call or render, by what failed (``feedsvc.errors``)."""
    outcome = ("unavailable" if isinstance(exc, ProviderUnavailable)
               else "dead_target" if isinstance(exc, DeadTarget)
               else "rejected" if isinstance(exc, ProviderRejected)
               else "render_error" if isinstance(exc, RenderError) else "error")
    DELIVERIES.labels(channel, provider, outcome).inc()


# --- the adapters' boundary ---------------------------------------------------------------

C = TypeVar("C", bound=type)


def instrumented(backend: str) -> Callable[[C], C]:
    """Class decorator for a store or queue adapter: every public coroutine method it
    defines is timed (``feedsvc_backend_request_duration_seconds``) and its failures counted
    (``feedsvc_backend_request_errors_total``; a client's error, such as a bad cursor, is
    not the backend's)."""

    def decorate(cls: C) -> C:
        for name, fn in list(vars(cls).items()):
            if name.startswith("_") or name == "close" or not inspect.iscoroutinefunction(fn):
                continue
            setattr(cls, name, _timed(backend, name, fn))
        return cls

    return decorate


def _timed(backend: str, op: str,
           fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    latency = BACKEND_LATENCY.labels(backend, op)
    errors = BACKEND_ERRORS.labels(backend, op)

    @functools.wraps(fn)
    async def call(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return await fn(*args, **kwargs)
        except ClientError:
            raise
        except Exception:
            errors.inc()
            raise
        finally:
            latency.observe(time.perf_counter() - start)

    return call


# --- HTTP ---------------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def route_of(request: web.Request) -> str:
    """The route's template, or ``unmatched`` (a 404 or 405): never the raw path, whose
    values would make a series each."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def http_middleware(access_log: bool) -> Middleware:
    """Counts and times every request, writes its access log line (unless ``access_log``
    is off) and gives each request its own log context (``feedsvc.logs``). Outermost, so it
    sees the status the client gets."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        start = time.perf_counter()
        status = 500
        with logs.bound(event_id=None, entry_id=None, user_id=None):
            try:
                response = await handler(request)
                status = response.status
                return response
            except web.HTTPException as exc:
                status = exc.status
                raise
            except asyncio.CancelledError:
                status = 499  # the client went away before the answer
                raise
            finally:
                elapsed = time.perf_counter() - start
                route = route_of(request)
                HTTP_REQUESTS.labels(route, request.method, str(status)).inc()
                HTTP_LATENCY.labels(route, request.method).observe(elapsed)
                if access_log and logs.access_log.isEnabledFor(20):
                    logs.access_log.info(
                        '%s "%s %s" %d %.1fms', request.remote, request.method,
                        request.path_qs, status, elapsed * 1000,
                        extra={"method": request.method, "path": request.path,
                               "route": route, "status": status,
                               "duration_ms": round(elapsed * 1000, 3),
                               "remote": request.remote})

    return middleware


# --- scrape time --------------------------------------------------------------------------


async def refresh(rt: Runtime) -> None:
    """Read the queue's figures and ping the store and the queue into the gauges (each
    process's scrape reads the shared queue)."""
    observe_runtime(rt)
    store_name, queue_name = backend_names(rt)
    queue_up = 1
    try:
        for stream in await rt.queue.stream_stats():
            QUEUE_DEPTH.labels(stream.queue, stream.priority).set(stream.depth)
            QUEUE_PENDING.labels(stream.queue, stream.priority).set(stream.pending)
            age = 0.0 if stream.oldest_ms is None else max(0.0, (rt.now_ms()
                                                                 - stream.oldest_ms) / 1000)
            QUEUE_OLDEST.labels(stream.queue, stream.priority).set(age)
        stats = await rt.queue.stats()
        QUEUE_SCHEDULED.set(stats.scheduled)
        DEAD_LETTERS_STORED.set(stats.dead_letters)
        QUEUE_SHED.set(stats.shed)
    except RetryableError:
        queue_up = 0
    BACKEND_UP.labels(queue_name).set(queue_up)
    try:
        await rt.store.ping()
        BACKEND_UP.labels(store_name).set(1)
    except RetryableError:
        BACKEND_UP.labels(store_name).set(0)


_seen: dict[tuple[str, ...], float] = {}  # counters read from the runtime, as last added


def _add_since(counter: Any, key: tuple[str, ...], now: float) -> None:
    """Add to ``counter`` what a plain counter of the runtime grew by since last read."""
    before = _seen.get(key, 0.0)
    if now > before:
        counter.inc(now - before)
    _seen[key] = now


def observe_runtime(rt: Runtime) -> None:
    """This process's read caches, breakers, CPU and memory into their metrics (each
    process does it every few seconds, ``feedsvc.ops.reporting``, and at a scrape)."""
    reads = rt.reads.statistics()
    source = str(id(rt.reads))  # one runtime's caches (a test process makes many)
    for field, (cache, result) in _READ_COUNTS.items():
        _add_since(READ_CACHE.labels(cache, result), (source, field), getattr(reads, field))
    READ_CACHE_ENTRIES.labels("head").set(reads.heads)
    READ_CACHE_ENTRIES.labels("following").set(reads.following_lists)
    for provider, breaker in rt.breakers.statistics().items():
        for state in BREAKER_STATES:
            BREAKER_STATE.labels(provider, state).set(1 if breaker.state == state else 0)
        source = str(id(rt.breakers))
        _add_since(BREAKER_REJECTED.labels(provider), (source, "rejected", provider),
                   breaker.rejected)
        _add_since(BREAKER_TRANSITIONS.labels(provider), (source, "transitions", provider),
                   breaker.transitions)
    PROCESS_CPU.set(time.process_time())
    PROCESS_MEMORY.set(_resident_bytes())


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def process_ended() -> None:
    """Forget this process's live gauges (multiprocess mode), as it stops."""
    if MULTIPROCESS_DIR:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid(), MULTIPROCESS_DIR)  # type: ignore[no-untyped-call]


def backend_names(rt: Runtime) -> tuple[str, str]:
    """(store, queue) as the ``backend`` label names them."""
    if rt.settings.embedded:
        return "sqlite", "sqlite_queue"
    return "cassandra", "redis"


def exposition() -> tuple[bytes, str]:
    """The registry in the Prometheus text format, and its content type: this process's,
    or in multiprocess mode every process's, added up."""
    if not MULTIPROCESS_DIR:
        return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
    from prometheus_client.multiprocess import MultiProcessCollector

    every = CollectorRegistry()
    MultiProcessCollector(every, MULTIPROCESS_DIR)  # type: ignore[no-untyped-call]
    return generate_latest(every), CONTENT_TYPE_LATEST


async def metrics_response(rt: Runtime) -> web.Response:
    await refresh(rt)
    body, content_type = exposition()
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


# --- reading values back (``feedsvc.ops``: the status page) --------------------------------


def samples(metric: Any) -> Iterable[tuple[str, dict[str, str], float]]:
    for family in metric.collect():
        for sample in family.samples:
            yield sample.name, sample.labels, sample.value


def total(metric: Any, **match: str) -> float:
    """The sum of a counter's ``_total`` samples whose labels match."""
    return sum(value for name, labels, value in samples(metric)
               if name.endswith("_total")
               and all(labels.get(k) == v for k, v in match.items()))


def histogram_buckets(metric: Any) -> list[float]:
    """A label-less histogram's count per bucket (not cumulative), +Inf last."""
    cumulative = [value for name, _, value in samples(metric) if name.endswith("_bucket")]
    return [cumulative[0], *(b - a for a, b in itertools.pairwise(cumulative))]
