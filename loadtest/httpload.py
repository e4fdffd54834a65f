"""The HTTP load generator behind every HTTP number of the benchmark harness.

One generator for all of them, so a ratio (feedsvc's requests/s over a no-op aiohttp server's)
compares like with like: the same client library, connection handling and accounting on both
sides of the division.

``run_load`` drives ``connections`` concurrent request loops over one aiohttp ``ClientSession``
(``TCPConnector(limit=connections)``, keep-alive), each loop sending its next request as soon as
the previous answer has been read (closed loop). Request number ``i`` is whatever
``requests(i)`` returns. The first ``warmup_s`` seconds are not recorded; after that every
request that *starts* inside the ``duration_s`` window is recorded with its latency, and the
window ends when the last of them has been answered.

``run_load_in_process`` runs the same measurement in separate processes (``spawn``), so the
generator does not share a GIL (or an event loop) with a server under test that lives in the
calling process. The request spec must then be picklable: a ``RequestPlan`` (templates cycled in
order) or any module-level callable.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import multiprocessing
import queue
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from typing import Any, TypeVar

import aiohttp
import msgspec

Request = tuple[str, str, dict[str, str], bytes | None]
"""(method, url, headers, body) of one request."""

RequestFn = Callable[[int], Request]
T = TypeVar("T")

REQUEST_TIMEOUT_S = 30.0
_START_TIMEOUT_S = 120.0  # for spawned generator processes to import and reach the start line
_ERROR_BACKOFF_S = 0.001  # after a failed connection, so a dead server is not hammered


class LoadResult(msgspec.Struct, frozen=True, kw_only=True):
    """What one load run measured (the warm-up excluded).

    ``requests`` counts every recorded request, ``errors`` those answered with a non-2xx
    status or failed with an exception; ``rps`` counts only the successful ones per second of
    ``duration_s``. Latencies cover all recorded requests, in milliseconds (nearest-rank
    percentiles). ``client_cpu_pct`` is the generator's own CPU time over the window, in
    percent of one core, summed over its processes: near 100 per process means the generator,
    not the server, may be the limit.
    """

    requests: int
    errors: int
    duration_s: float
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    connections: int
    processes: int = 1
    client_cpu_pct: float = 0.0
    first_error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return msgspec.structs.asdict(self)


@dataclass(frozen=True)
class RequestPlan:
    """A picklable request spec: request ``i`` is ``templates[i % len(templates)]`` (any
    sequence of (method, url, headers, body) is accepted and kept as a tuple)."""

    templates: Sequence[Request]

    def __post_init__(self) -> None:
        if not self.templates:
            raise ValueError("a RequestPlan needs at least one request template")
        object.__setattr__(self, "templates", tuple(self.templates))

    def __call__(self, i: int) -> Request:
        return self.templates[i % len(self.templates)]

    @classmethod
    def get(cls, url: str, headers: Mapping[str, str] | None = None) -> RequestPlan:
        """The same ``GET url`` over and over."""
        return cls((("GET", url, dict(headers or {}), None),))


@dataclass(frozen=True)
class _Strided:
    """Request numbers of generator process ``index`` out of ``step``: index, index+step, ..."""

    inner: RequestFn
    index: int
    step: int

    def __call__(self, i: int) -> Request:
        return self.inner(i * self.step + self.index)


class _Raw(msgspec.Struct, kw_only=True):
    """One generator process's recording, before the processes are merged."""

    requests: int
    errors: int
    duration_s: float
    cpu_s: float
    latencies_ms: list[float]
    first_error: str | None


async def run_load(
    requests: RequestFn, *, connections: int, duration_s: float, warmup_s: float = 1.0
) -> LoadResult:
    """Closed-loop load from this process and event loop; see the module docstring."""
    raw = await _measure(requests, connections=connections, duration_s=duration_s,
                         warmup_s=warmup_s)
    return _summarize([raw], connections=connections)


def run_load_in_process(
    requests: RequestFn,
    *,
    connections: int,
    duration_s: float,
    warmup_s: float = 1.0,
    processes: int = 1,
) -> LoadResult:
    """``run_load`` in ``processes`` spawned processes that start together, the connections
    split between them (request ``i`` still goes to exactly one of them); blocks until done.
    ``requests`` must be picklable (a ``RequestPlan`` or a module-level function)."""
    if processes < 1 or connections < processes:
        raise ValueError("need 1 <= processes <= connections")
    ctx = multiprocessing.get_context("spawn")
    results: Queue[tuple[int, _Raw | None, str | None]] = ctx.Queue()
    start_line = ctx.Barrier(processes)
    shares = [connections // processes + (k < connections % processes) for k in range(processes)]
    workers = [
        ctx.Process(
            target=_generator_process,
            args=(_Strided(requests, k, processes) if processes > 1 else requests, shares[k],
                  duration_s, warmup_s, start_line, results, k),
            name=f"httpload-{k}", daemon=True,
        )
        for k in range(processes)
    ]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + _START_TIMEOUT_S + warmup_s + duration_s + REQUEST_TIMEOUT_S
    reports, failures = collect_results(workers, results, deadline)
    if failures:
        raise RuntimeError("load generator failed:\n" + "\n".join(failures))
    raws = [raw for raw in reports if raw is not None]
    return _summarize(raws, connections=connections)


def collect_results(
    workers: Sequence[BaseProcess],
    results: Queue[tuple[int, T | None, str | None]],
    deadline: float,
) -> tuple[list[T | None], list[str]]:
    """Wait for every worker's ``(index, value, failure)`` report, then join the workers
    (terminating any still alive). Returns the values and the failures; a worker that exits
    without reporting, or the ``deadline`` (monotonic) passing, is a failure too."""
    values: list[T | None] = []
    failures: list[str] = []
    reported: set[int] = set()
    try:
        while len(reported) < len(workers):
            try:
                index, value, failure = results.get(timeout=0.5)
            except queue.Empty:
                silent = [w for k, w in enumerate(workers)
                          if k not in reported and w.exitcode is not None]
                if silent:
                    try:  # it may have reported just before exiting
                        index, value, failure = results.get(timeout=2.0)
                    except queue.Empty:
                        failures.append(f"{silent[0].name} exited with code {silent[0].exitcode} "
                                        "without reporting")
                        break
                elif time.monotonic() > deadline:
                    failures.append("worker processes did not report in time")
                    break
                else:
                    continue
            reported.add(index)
            values.append(value)
            if failure is not None:
                failures.append(failure)
    finally:
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.terminate()
                worker.join()
    return values, failures


def _generator_process(
    requests: RequestFn,
    connections: int,
    duration_s: float,
    warmup_s: float,
    start_line: Barrier,
    results: Queue[tuple[int, _Raw | None, str | None]],
    index: int,
) -> None:
    try:
        start_line.wait(timeout=_START_TIMEOUT_S)
        raw = asyncio.run(_measure(requests, connections=connections, duration_s=duration_s,
                                   warmup_s=warmup_s))
    except Exception:
        results.put((index, None, traceback.format_exc()))
    else:
        results.put((index, raw, None))


async def _measure(
    requests: RequestFn, *, connections: int, duration_s: float, warmup_s: float
) -> _Raw:
    if connections < 1 or duration_s <= 0 or warmup_s < 0:
        raise ValueError("need connections >= 1, duration_s > 0, warmup_s >= 0")
    numbers = itertools.count()
    latencies: list[float] = []
    errors = 0
    first_error: str | None = None
    last_end = 0.0
    cpu_marks: list[float] = []

    connector = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        begin = time.perf_counter()
        measure_from = begin + warmup_s
        stop_at = measure_from + duration_s

        async def cpu_clock() -> None:
            await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
            cpu_marks.append(time.process_time())

        async def one_loop() -> None:
            nonlocal errors, first_error, last_end
            while True:
                started = time.perf_counter()
                if started >= stop_at:
                    return
                method, url, headers, body = requests(next(numbers))
                failure: str | None = None
                try:
                    async with session.request(method, url, headers=headers, data=body) as resp:
                        await resp.read()
                        if not 200 <= resp.status < 300:
                            failure = f"HTTP {resp.status} from {method} {url}"
                except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                    failure = f"{type(exc).__name__}: {exc} ({method} {url})"
                ended = time.perf_counter()
                if started >= measure_from:
                    latencies.append((ended - started) * 1000.0)
                    last_end = max(last_end, ended)
                    if failure is not None:
                        errors += 1
                        first_error = first_error or failure
                if failure is not None:
                    await asyncio.sleep(_ERROR_BACKOFF_S)

        clock = asyncio.create_task(cpu_clock())
        await asyncio.gather(*(one_loop() for _ in range(connections)))
        await clock
        cpu_s = time.process_time() - cpu_marks[0]
    return _Raw(
        requests=len(latencies), errors=errors,
        duration_s=max(0.0, last_end - measure_from) if latencies else 0.0,
        cpu_s=cpu_s, latencies_ms=latencies, first_error=first_error,
    )


def _summarize(raws: Sequence[_Raw], *, connections: int) -> LoadResult:
    latencies = sorted(itertools.chain.from_iterable(r.latencies_ms for r in raws))
    requests = sum(r.requests for r in raws)
    errors = sum(r.errors for r in raws)
    duration = max((r.duration_s for r in raws), default=0.0)
    return LoadResult(
        requests=requests,
        errors=errors,
        duration_s=round(duration, 3),
        rps=round((requests - errors) / duration, 1) if duration > 0 else 0.0,
        p50_ms=percentile(latencies, 50.0),
        p95_ms=percentile(latencies, 95.0),
        p99_ms=percentile(latencies, 99.0),
        max_ms=round(latencies[-1], 3) if latencies else 0.0,
        connections=connections,
        processes=len(raws),
        client_cpu_pct=round(100.0 * sum(r.cpu_s for r in raws) / duration, 1)
        if duration > 0 else 0.0,
        first_error=next((r.first_error for r in raws if r.first_error), None),
    )


def percentile(ordered: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending sequence (0.0 when empty)."""
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return round(ordered[rank - 1], 3)
