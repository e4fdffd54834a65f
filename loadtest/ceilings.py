"""Ceilings of this machine: the raw limits feedsvc's own numbers are divided by.

The measurements, each of the plain building block feedsvc stands on, driven the way feedsvc
drives it:

* ``cassandra_insert_ceiling``: inbox rows per second into a table shaped exactly like
  ``inbox_by_user`` (``inbox_ceiling_by_user``), written with feedsvc's driver setup
  (``feedsvc.store.cassandra.connect_cluster``: protocol v5, token-aware DC-aware routing) as
  single-row prepared inserts with 256 in flight, and as unlogged batches of rows grouped by
  replica set (16 and 64 rows, and as many as feedsvc's batch-size estimate lets into one
  batch, at most 128; 32 batches in flight), each from 1 and from N processes.
* ``cassandra_read_ceiling``: inbox slices per second read by the driver alone, the read
  path's first query (a prepared single-partition ``SELECT item ... LIMIT 51``), 32 in
  flight per process, from 1 and 2 processes.
* ``redis_ceilings``: ``redis-benchmark`` ops/s for ``XADD``, ``SET ... NX`` and the read
  path's ``MGET`` of two versions, with and without pipelining.
* ``aiohttp_noop_ceiling``: requests/s of a no-op aiohttp handler (``loadtest.noop_server``)
  under ``loadtest.httpload``, the generator every HTTP number of the harness uses, and
  under ``wrk`` (``aiohttp_noop_wrk_ceiling``), which measures the server rather than the
  Python client.

``python -m loadtest.ceilings [--quick]`` runs all three and prints one JSON document on stdout
(progress goes to stderr). Everything stays on 127.0.0.1 and is bounded in rows, requests and
seconds. Cassandra, Redis, the servers under test and the clients all share this machine's
cores: the ``machine_busy_pct`` and ``client_cpu_pct`` figures reported next to each number say
how much of it the client itself took, and every run waits for the machine to be quiet first
(``settle``) so leftovers of one run are not charged to the next.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import multiprocessing
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import aiohttp
import redis
from cassandra.query import BoundStatement

from feedsvc.migrate import load_migrations
from feedsvc.store.cassandra import (
    connect_cluster,
    inbox_batch,
    replica_groups,
    rows_per_batch,
)
from loadtest.httpload import RequestPlan, collect_results, run_load_in_process

log = logging.getLogger("loadtest.ceilings")

REPO_ROOT = Path(__file__).resolve().parent.parent

# --- Cassandra -----------------------------------------------------------------------------
SOURCE_TABLE = "inbox_by_user"
CEILING_TABLE = "inbox_ceiling_by_user"
INBOX_TTL_S = 30 * 86_400  # feedsvc's default inbox retention
SINGLE_IN_FLIGHT = 256  # single-row inserts in flight per process
SINGLE_MAX_ROWS = 150_000  # single rows run ~5x slower than batches: a reference, not a contender
BATCH_IN_FLIGHT = 32  # batches in flight per process
BATCH_SIZES = (16, 64)  # plus the largest batch feedsvc would send for these rows
# Rows are grouped by replica set and cut into batches up to 10,000 at a time (a whole
# benchmark event): every batch but an event's last is full, whatever its size. feedsvc's
# fan-out cuts pages of 1,000 followers, so it sends about 2% more batches for the same rows.
GROUP_ROWS = 10_000
_MAX_ERRORS = 100  # a process stops sending after this many failed requests
_WORKER_START_TIMEOUT_S = 120.0
_MIN_ROWS_PER_S = 500.0  # a run slower than this is treated as hung
_INSERT_CQL = ("INSERT INTO {ks}.{table} (user_id, created_at, event_id, author_id, direct, item) "
               "VALUES (?, ?, ?, ?, ?, ?) USING TTL ?")

# --- Redis ---------------------------------------------------------------------------------
REDIS_CLIENTS = 50
REDIS_PIPELINE = 16
REDIS_RANDOM_KEYS = 10_000_000
REDIS_PREFIX = "bench:ceiling:"  # every key the benchmark writes; deleted before and after

_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,47}$")


# =========================================================================================
# Cassandra
# =========================================================================================


def inbox_table_ddl(keyspace: str) -> list[str]:
    """The statements that make ``keyspace.table`` a copy of ``inbox_by_user`` as the
    migrations in ``cql/`` leave it: its CREATE TABLE (as IF NOT EXISTS) and any later
    ALTER TABLE, in file order, renamed. Read from the migrations so the copy cannot drift."""
    _check_name(keyspace)
    table = CEILING_TABLE
    head = re.compile(
        rf"^(CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?|ALTER\s+TABLE\s+)(?:\w+\.)?"
        rf"{SOURCE_TABLE}(?=[\s(])",
        re.IGNORECASE,
    )
    out: list[str] = []
    for migration in load_migrations():
        for statement in migration.statements:
            match = head.match(statement)
            if match is None:
                continue
            verb = match.group(1)
            if verb.upper().startswith("CREATE"):
                verb = "CREATE TABLE IF NOT EXISTS "
            out.append(f"{verb}{keyspace}.{table}{statement[match.end():]}")
    if not out or not out[0].startswith("CREATE"):
        raise RuntimeError(f"no CREATE TABLE {SOURCE_TABLE} found in the migrations")
    return out


def create_keyspace(hosts: Sequence[str], keyspace: str) -> None:
    """CREATE KEYSPACE IF NOT EXISTS (SimpleStrategy, replication factor 1)."""
    _check_name(keyspace)
    cluster, session = connect_cluster(hosts)
    try:
        session.execute(
            f"CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = "
            "{'class': 'SimpleStrategy', 'replication_factor': 1}",
            timeout=60,
        )
    finally:
        cluster.shutdown()


def cassandra_insert_ceiling(
    hosts: Sequence[str],
    keyspace: str,
    *,
    rows: int,
    payload_bytes: int = 120,
    partitions: int = 0,
    processes: Sequence[int] = (1, 2),
    single: bool = True,
    batch_sizes: Sequence[int] = BATCH_SIZES,
) -> dict[str, Any]:
    """Inbox rows/s Cassandra takes from this machine, per write pattern.

    Patterns: ``single`` (one prepared INSERT per row, ``SINGLE_IN_FLIGHT`` in flight per
    process, completion callbacks issuing the next) and ``batch<N>`` (unlogged batches of N rows
    sharing a replica set, ``BATCH_IN_FLIGHT`` in flight per process), each from every process
    count in ``processes`` (spawned processes, each with its own cluster connection and an equal
    share of the ``rows``; rate = rows written / wall time from the common start to the last
    process done). Rows look like a fan-out: ``partitions`` users (0: a new user for every
    row) each get one row per "event" (its own created_at and event_id), all rows of an event
    share the author_id and a ``payload_bytes`` item, written with a TTL. As in feedsvc, the
    values an event's rows share are serialized once and only the user id is added per row.
    Building the statements is part of the timed work; ``single=False`` leaves the (slow,
    never best) single-row pattern out, ``batch_sizes`` picks the fixed batch sizes tried
    besides the largest one feedsvc would send. The
    table is truncated before every pattern (after an untimed warm-up pass) and at the end, and
    each pattern starts once the machine is quiet again (``settle``).

    Returns ``{"patterns": {name: rows_per_s}, "best": {"pattern", "rows_per_s"}, "runs":
    {name: details}, ...}``; ``best`` prefers patterns that ran without errors.
    """
    if rows < 1 or payload_bytes < 0 or partitions < 0 or not processes or min(processes) < 1:
        raise ValueError("need rows >= 1, payload_bytes >= 0, partitions >= 0 and process "
                         "counts >= 1")
    table_info = _prepare_table(hosts, keyspace)
    shapes: list[tuple[str, int, int]] = [("single", 0, SINGLE_IN_FLIGHT)] if single else []
    largest = rows_per_batch(payload_bytes + len(_event_id(0)) + len(_AUTHOR_ID))
    shapes += [(f"batch{size}", size, BATCH_IN_FLIGHT)
               for size in sorted({*batch_sizes, largest})]
    created_at = int(time.time() * 1000)

    runs: dict[str, dict[str, Any]] = {}
    cluster, session = connect_cluster(hosts)
    try:
        _truncate(session, keyspace)
        warmup_rows = min(rows, max(20_000, rows // 4))
        _progress(f"cassandra: warm-up, {warmup_rows} rows as batch64 (not reported)")
        warmup = _run_insert_pattern(
            hosts=tuple(hosts), keyspace=keyspace, batch_rows=64, in_flight=BATCH_IN_FLIGHT,
            rows=warmup_rows, processes=1, payload_bytes=payload_bytes, partitions=partitions,
            created_at=created_at)
        for pattern, batch_rows, in_flight in shapes:
            for count in processes:
                name = f"{pattern}_{count}p"
                runs[name] = measure_pattern(
                    session, hosts, keyspace, name, batch_rows=batch_rows, in_flight=in_flight,
                    processes=count, rows=rows if batch_rows else min(rows, SINGLE_MAX_ROWS),
                    payload_bytes=payload_bytes, partitions=partitions, created_at=created_at)
        _truncate(session, keyspace)
    finally:
        cluster.shutdown()

    clean = {n: r for n, r in runs.items() if r["errors"] == 0} or runs
    best = max(clean, key=lambda n: clean[n]["rows_per_s"])
    return {
        "patterns": {n: r["rows_per_s"] for n, r in runs.items()},
        "best": {"pattern": best, "rows_per_s": runs[best]["rows_per_s"]},
        "runs": runs,
        "warmup": warmup,
        "rows_per_pattern": rows,
        "payload_bytes": payload_bytes,
        "partitions": partitions or rows,
        "ttl_s": INBOX_TTL_S,
        "table": table_info,
    }


def measure_pattern(session: Any, hosts: Sequence[str], keyspace: str, name: str, *,
                    batch_rows: int, in_flight: int, processes: int, rows: int,
                    payload_bytes: int, partitions: int, created_at: int) -> dict[str, Any]:
    """One timed run of one write pattern, from an empty ceiling table once the machine is
    quiet (``settle``); ``batch_rows`` 0 means single-row inserts."""
    _truncate(session, keyspace)
    quiet = settle()
    _progress(f"cassandra: {name}, {rows} rows")
    run = _run_insert_pattern(
        hosts=tuple(hosts), keyspace=keyspace, batch_rows=batch_rows, in_flight=in_flight,
        rows=rows, processes=processes, payload_bytes=payload_bytes, partitions=partitions,
        created_at=created_at)
    run["settle"] = quiet
    _progress(f"cassandra: {name} -> {run['rows_per_s']:.0f} rows/s "
              f"(machine {run['machine_busy_pct']}% busy)")
    return run


def repeat_best(session: Any, hosts: Sequence[str], keyspace: str,
                ceiling: dict[str, Any]) -> dict[str, Any]:
    """The best pattern of a ``cassandra_insert_ceiling`` result measured once more, with
    the same rows (new event times), leaving the table empty: for measuring the ceiling
    again between other measurements, so both see the machine in the same state."""
    name = ceiling["best"]["pattern"]
    run = ceiling["runs"][name]
    single = name.startswith("single")
    try:
        return measure_pattern(
            session, hosts, keyspace, f"{name} again",
            batch_rows=0 if single else run["rows_per_request"],
            in_flight=run["in_flight_per_process"], processes=run["processes"],
            rows=min(ceiling["rows_per_pattern"], SINGLE_MAX_ROWS) if single
            else ceiling["rows_per_pattern"],
            payload_bytes=ceiling["payload_bytes"], partitions=ceiling["partitions"],
            created_at=int(time.time() * 1000))
    finally:
        _truncate(session, keyspace)


def _prepare_table(hosts: Sequence[str], keyspace: str) -> dict[str, Any]:
    """Create the ceiling table if missing; report whether it matches a live inbox_by_user in
    the same keyspace (None when the keyspace has none to compare with)."""
    statements = inbox_table_ddl(keyspace)
    cluster, session = connect_cluster(hosts)
    try:
        ks_meta = cluster.metadata.keyspaces.get(keyspace)
        if ks_meta is None:
            raise RuntimeError(f"keyspace {keyspace} does not exist")
        created = CEILING_TABLE not in ks_meta.tables
        if created:
            for statement in statements:
                session.execute(statement, timeout=60)
            cluster.refresh_table_metadata(keyspace, CEILING_TABLE)
        ks_meta = cluster.metadata.keyspaces[keyspace]
        ours = ks_meta.tables[CEILING_TABLE].as_cql_query()
        source = ks_meta.tables.get(SOURCE_TABLE)
        matches = None
        if source is not None:
            theirs = source.as_cql_query().replace(
                f"{keyspace}.{SOURCE_TABLE} ", f"{keyspace}.{CEILING_TABLE} ", 1)
            matches = theirs == ours
        return {"name": f"{keyspace}.{CEILING_TABLE}", "created_now": created,
                "matches_live_inbox_by_user": matches, "ddl": statements}
    finally:
        cluster.shutdown()


def _truncate(session: Any, keyspace: str) -> None:
    session.execute(f"TRUNCATE {keyspace}.{CEILING_TABLE}", timeout=120)


@dataclass(frozen=True)
class _InsertJob:
    hosts: tuple[str, ...]
    keyspace: str
    batch_rows: int  # 0: single-row inserts
    in_flight: int
    first_row: int
    rows: int
    payload_bytes: int
    partitions: int  # 0: every row in its own partition
    created_at: int
    timeout_s: float


_Report = tuple[int, dict[str, Any] | None, str | None]


def _run_insert_pattern(
    *,
    hosts: tuple[str, ...],
    keyspace: str,
    batch_rows: int,
    in_flight: int,
    rows: int,
    processes: int,
    payload_bytes: int,
    partitions: int,
    created_at: int,
) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    results: Queue[_Report] = ctx.Queue()
    start_line = ctx.Barrier(processes)
    timeout_s = 60.0 + rows / _MIN_ROWS_PER_S
    jobs, first = [], 0
    for k in range(processes):
        share = rows // processes + (k < rows % processes)
        jobs.append(_InsertJob(hosts, keyspace, batch_rows, in_flight, first, share,
                               payload_bytes, partitions, created_at, timeout_s))
        first += share
    workers = [
        ctx.Process(target=_insert_process, args=(job, start_line, results, k),
                    name=f"ceiling-insert-{k}", daemon=True)
        for k, job in enumerate(jobs)
    ]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + _WORKER_START_TIMEOUT_S + timeout_s + 30
    collected, failures = collect_results(workers, results, deadline)
    if failures:
        raise RuntimeError("cassandra insert run failed:\n" + "\n".join(failures))
    reports = [r for r in collected if r is not None]

    wall = max(r["ended"] for r in reports) - min(r["started"] for r in reports)
    ok = sum(r["rows_ok"] for r in reports)
    warnings: dict[str, int] = {}
    samples: dict[str, str] = {}
    for r in reports:
        for kind, n in r["server_warnings"].items():
            warnings[kind] = warnings.get(kind, 0) + n
        for kind, text in r["warning_samples"].items():
            samples.setdefault(kind, text)
    busy = [r["machine_busy_pct"] for r in reports if r["machine_busy_pct"] is not None]
    machine_busy = round(statistics.fmean(busy), 1) if busy else None
    client_cpu = round(100.0 * sum(r["cpu_s"] for r in reports) / wall, 1) if wall > 0 else 0.0
    return {
        "rows_per_s": round(ok / wall, 1) if wall > 0 else 0.0,
        "rows_ok": ok,
        "rows_failed": sum(r["rows_failed"] for r in reports),
        "requests": sum(r["requests"] for r in reports),
        "errors": sum(r["errors"] for r in reports),
        "first_error": next((r["first_error"] for r in reports if r["first_error"]), None),
        "timed_out": any(r["timed_out"] for r in reports),
        "wall_s": round(wall, 3),
        "processes": processes,
        "rows_per_request": batch_rows or 1,
        "in_flight_per_process": in_flight,
        # CPU in percent of one core, except machine_busy_pct (of all cores). What the client
        # processes did not use went to Cassandra (and anything else running meanwhile).
        "client_cpu_pct": client_cpu,
        "machine_busy_pct": machine_busy,
        "rest_of_machine_cpu_pct": round(machine_busy * (os.cpu_count() or 1) - client_cpu, 1)
        if machine_busy is not None else None,
        "server_warnings": warnings,
        "server_warning_samples": samples,
    }


class _ServerWarnings(logging.Filter):
    """Counts (and swallows) the driver's "Server warning: ..." log lines, by kind."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}
        self.samples: dict[str, str] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if not text.startswith("Server warning:"):
            return True
        if "Unlogged batch covering" in text:
            kind = "unlogged_batch_across_partitions"
        elif "is of size" in text:
            kind = "batch_size_warn_threshold"
        else:
            kind = "other"
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.samples.setdefault(kind, text)
        return False


def _insert_process(
    job: _InsertJob, start_line: Barrier, results: Queue[_Report], index: int
) -> None:
    """One client process: connect, prepare, wait for the others, write its share."""
    warnings = _ServerWarnings()
    logging.getLogger("cassandra.protocol").addFilter(warnings)
    cluster = None
    try:
        cluster, session = connect_cluster(job.hosts)
        prepared = session.prepare(_INSERT_CQL.format(ks=job.keyspace, table=CEILING_TABLE))
        statements = _statements(cluster.metadata, prepared, job)
        start_line.wait(timeout=_WORKER_START_TIMEOUT_S)
        machine_before = machine_cpu()
        cpu_before = time.process_time()
        pump = _Pump(session, statements, job.in_flight)
        finished = pump.run(job.timeout_s)
        cpu_s = time.process_time() - cpu_before
        machine_after = machine_cpu()
        report = {
            "started": pump.started,
            "ended": pump.ended if finished else time.monotonic(),
            "timed_out": not finished,
            "rows_ok": pump.rows_ok,
            "rows_failed": pump.rows_failed,
            "requests": pump.requests,
            "errors": pump.errors,
            "first_error": pump.first_error or ("timed out" if not finished else None),
            "cpu_s": cpu_s,
            "machine_busy_pct": busy_pct(machine_before, machine_after),
            "server_warnings": dict(warnings.counts),
            "warning_samples": dict(warnings.samples),
        }
    except Exception:
        start_line.abort()  # release the other processes instead of letting them wait
        results.put((index, None, traceback.format_exc()))
    else:
        results.put((index, report, None))
    finally:
        if cluster is not None:
            cluster.shutdown()


def _statements(metadata: Any, prepared: Any, job: _InsertJob) -> Iterator[tuple[Any, int]]:
    """(statement, rows in it) for the job's rows, built lazily (while the pump sends).

    Row ``i`` goes to user ``i % partitions`` as part of event ``i // partitions``; up to
    ``GROUP_ROWS`` of an event at a time are grouped by replica set and cut into batches by
    the same code feedsvc's fan-out uses for a page of followers."""
    blob = bytes(i % 251 for i in range(job.payload_bytes))
    per_event = job.partitions or job.first_row + job.rows
    end = job.first_row + job.rows
    start = job.first_row
    while start < end:
        event, offset = divmod(start, per_event)
        stop = min(end, start + GROUP_ROWS, (event + 1) * per_event)
        created_at = job.created_at + event
        # Serialize what the event's rows share once; only the user id (partition key) differs.
        shared = tuple(prepared.bind(("", created_at, _event_id(created_at), _AUTHOR_ID, False,
                                      blob, INBOX_TTL_S)).values[1:])
        keys = [f"cu{i}" for i in range(offset, offset + stop - start)]
        start = stop
        if not job.batch_rows:
            for key in keys:
                bound = BoundStatement(prepared)
                bound.values = [key.encode(), *shared]
                yield bound, 1
            continue
        # Grouped and batched by the same code as feedsvc's fan-out.
        for group in replica_groups(metadata, job.keyspace, keys):
            for first in range(0, len(group), job.batch_rows):
                chunk = group[first:first + job.batch_rows]
                yield inbox_batch(prepared, chunk, shared), len(chunk)


_AUTHOR_ID = "ceiling-author"


def _event_id(created_at: int) -> str:
    return f"ceiling-{created_at:013d}"


class _Pump:
    """Keeps ``in_flight`` requests outstanding: each completion callback (on the driver's
    event loop thread) sends the next statement, until the statements run out."""

    def __init__(self, session: Any, statements: Iterator[tuple[Any, int]], in_flight: int):
        self._session = session
        self._statements = statements
        self._in_flight = in_flight
        self._lock = threading.Lock()
        self._finished = threading.Event()
        self._pending = 0
        self._stopping = False
        self.started = 0.0
        self.ended = 0.0
        self.requests = 0
        self.rows_ok = 0
        self.rows_failed = 0
        self.errors = 0
        self.first_error: str | None = None

    def run(self, timeout_s: float) -> bool:
        """Send everything; False if it did not finish within ``timeout_s``."""
        self.started = time.monotonic()
        for _ in range(self._in_flight):
            self._send_next()
        return self._finished.wait(timeout_s)

    def _send_next(self) -> None:
        with self._lock:
            item = None if self._stopping else next(self._statements, None)
            if item is None:
                if self._pending == 0 and not self._finished.is_set():
                    self.ended = time.monotonic()
                    self._finished.set()
                return
            self._pending += 1
            self.requests += 1
        statement, rows = item
        try:
            future = self._session.execute_async(statement)
        except Exception as exc:
            self._failed(exc, rows)
            return
        future.add_callbacks(self._succeeded, self._failed,
                             callback_args=(rows,), errback_args=(rows,))

    def _succeeded(self, _result: Any, rows: int) -> None:
        with self._lock:
            self._pending -= 1
            self.rows_ok += rows
        self._send_next()

    def _failed(self, exc: BaseException, rows: int) -> None:
        with self._lock:
            self._pending -= 1
            self.rows_failed += rows
            self.errors += 1
            if self.first_error is None:
                self.first_error = f"{type(exc).__name__}: {exc}"
            # Stop early on a broken server (and bound recursion on synchronous failures).
            self._stopping = self.errors >= _MAX_ERRORS
        self._send_next()


# --- reads ---------------------------------------------------------------------------------
READ_IN_FLIGHT = 32  # reads in flight per process
READ_LIMIT = 51  # the read path's first inbox query: a page of 50 and one more
_READ_CQL = "SELECT item FROM {ks}.{table} WHERE user_id = ? LIMIT ?"


@dataclass(frozen=True)
class _ReadJob:
    hosts: tuple[str, ...]
    keyspace: str
    table: str
    users: tuple[str, ...]
    limit: int
    in_flight: int
    duration_s: float


def cassandra_read_ceiling(
    hosts: Sequence[str], keyspace: str, *, users: Sequence[str] | None = None,
    table: str = SOURCE_TABLE, processes: Sequence[int] = (1, 2), duration_s: float = 10.0,
    in_flight: int = READ_IN_FLIGHT, limit: int = READ_LIMIT, payload_bytes: int = 236,
    partitions: int = 50, rows_per_partition: int = 60,
) -> dict[str, Any]:
    """Inbox slices per second read by the driver alone: the read path's first query
    (``SELECT item ... WHERE user_id = ? LIMIT 51``, prepared, one partition), ``in_flight``
    outstanding per process, cycling over ``users``, for ``duration_s``, from each number of
    ``processes``. Without ``users`` it reads its own table (``inbox_ceiling_by_user``, filled
    first with ``partitions`` inboxes of ``rows_per_partition`` items of ``payload_bytes``).

    Returns ``{"patterns": {"read_1p": {...}, ...}, "best": {"pattern", "queries_per_s",
    "rows_per_s"}}``; each pattern has queries/s, rows/s, p50/p99 ms and errors."""
    hosts = tuple(hosts)
    if users is None:
        table = CEILING_TABLE
        users = [f"reader{n}" for n in range(partitions)]
        _fill_read_table(hosts, keyspace, users, rows_per_partition, payload_bytes)
    _check_name(keyspace)
    _check_name(table)
    patterns: dict[str, Any] = {}
    for count in processes:
        quiet = settle()
        _progress(f"cassandra: reads of {limit} rows, {count} process(es), {in_flight} in "
                  f"flight each, {duration_s:g} s")
        run = _run_read_pattern(_ReadJob(hosts, keyspace, table, tuple(users), limit,
                                         in_flight, duration_s), count)
        run["settle"] = quiet
        patterns[f"read_{count}p"] = run
    name, best = max(patterns.items(), key=lambda kv: kv[1]["queries_per_s"])
    return {"patterns": patterns, "table": f"{keyspace}.{table}", "limit": limit,
            "best": {"pattern": name, "queries_per_s": best["queries_per_s"],
                     "rows_per_s": best["rows_per_s"]}}


def _fill_read_table(hosts: tuple[str, ...], keyspace: str, users: Sequence[str],
                     rows: int, payload_bytes: int) -> None:
    from cassandra.concurrent import execute_concurrent_with_args

    _prepare_table(hosts, keyspace)
    cluster, session = connect_cluster(hosts)
    try:
        _truncate(session, keyspace)
        insert = session.prepare(_INSERT_CQL.format(ks=keyspace, table=CEILING_TABLE))
        now = int(time.time() * 1000)
        blob = b"x" * payload_bytes
        args = [(user, now - n, _event_id(now - n), "author", False, blob, INBOX_TTL_S)
                for user in users for n in range(rows)]
        execute_concurrent_with_args(session, insert, args, concurrency=64,
                                     raise_on_first_error=True)
    finally:
        cluster.shutdown()


def _run_read_pattern(job: _ReadJob, processes: int) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    results: Queue[_Report] = ctx.Queue()
    start_line = ctx.Barrier(processes)
    workers = [ctx.Process(target=_read_process, args=(job, start_line, results, k),
                           name=f"ceiling-read-{k}", daemon=True) for k in range(processes)]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + _WORKER_START_TIMEOUT_S + job.duration_s + 60
    collected, failures = collect_results(workers, results, deadline)
    if failures:
        raise RuntimeError("cassandra read run failed:\n" + "\n".join(failures))
    reports = [r for r in collected if r is not None]
    wall = max(r["ended"] for r in reports) - min(r["started"] for r in reports)
    latencies = sorted(x for r in reports for x in r["latencies_ms"])
    queries = sum(r["queries"] for r in reports)
    busy = [r["machine_busy_pct"] for r in reports if r["machine_busy_pct"] is not None]
    return {
        "queries_per_s": round(queries / wall, 1) if wall > 0 else 0.0,
        "rows_per_s": round(sum(r["rows"] for r in reports) / wall, 1) if wall > 0 else 0.0,
        "queries": queries, "errors": sum(r["errors"] for r in reports),
        "first_error": next((r["first_error"] for r in reports if r["first_error"]), None),
        "p50_ms": round(_pct(latencies, 50), 2), "p99_ms": round(_pct(latencies, 99), 2),
        "wall_s": round(wall, 3), "processes": processes,
        "in_flight_per_process": job.in_flight,
        "client_cpu_pct": round(100.0 * sum(r["cpu_s"] for r in reports) / wall, 1)
        if wall > 0 else 0.0,
        "machine_busy_pct": round(statistics.fmean(busy), 1) if busy else None,
    }


def _pct(ordered: Sequence[float], pct: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def _read_process(job: _ReadJob, start_line: Barrier, results: Queue[_Report],
                  index: int) -> None:
    """One client process: connect, prepare, wait for the others, read for the duration."""
    cluster = None
    try:
        cluster, session = connect_cluster(job.hosts)
        prepared = session.prepare(_READ_CQL.format(ks=job.keyspace, table=job.table))
        users = job.users[index:] + job.users[:index]  # the processes start apart
        pump = _ReadPump(session, prepared, users, job.limit, job.in_flight)
        pump.run(1.0)  # warm-up: connections and the server's caches
        start_line.wait(timeout=_WORKER_START_TIMEOUT_S)
        machine_before = machine_cpu()
        cpu_before = time.process_time()
        pump = _ReadPump(session, prepared, users, job.limit, job.in_flight)
        pump.run(job.duration_s)
        report = {"started": pump.started, "ended": pump.ended, "queries": pump.queries,
                  "rows": pump.rows, "errors": pump.errors, "first_error": pump.first_error,
                  "latencies_ms": pump.latencies_ms,
                  "cpu_s": time.process_time() - cpu_before,
                  "machine_busy_pct": busy_pct(machine_before, machine_cpu())}
    except Exception:
        start_line.abort()
        results.put((index, None, traceback.format_exc()))
    else:
        results.put((index, report, None))
    finally:
        if cluster is not None:
            cluster.shutdown()


class _ReadPump:
    """Keeps ``in_flight`` reads outstanding until the time is up (callbacks on the driver's
    event loop thread send the next read)."""

    def __init__(self, session: Any, prepared: Any, users: Sequence[str], limit: int,
                 in_flight: int) -> None:
        self._session, self._prepared, self._users = session, prepared, users
        self._limit, self._in_flight = limit, in_flight
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._pending = 0
        self._next = 0
        self._until = 0.0
        self.started = self.ended = 0.0
        self.queries = self.rows = self.errors = 0
        self.first_error: str | None = None
        self.latencies_ms: list[float] = []

    def run(self, duration_s: float) -> None:
        self.started = time.monotonic()
        self._until = self.started + duration_s
        for _ in range(self._in_flight):
            self._send()
        self._done.wait(duration_s + 30)
        self.ended = time.monotonic()

    def _send(self) -> None:
        with self._lock:
            if time.monotonic() >= self._until or self.errors >= _MAX_ERRORS:
                if self._pending == 0:
                    self._done.set()
                return
            self._pending += 1
            user = self._users[self._next % len(self._users)]
            self._next += 1
        sent = time.monotonic()
        future = self._session.execute_async(self._prepared.bind((user, self._limit)))
        future.add_callbacks(self._ok, self._failed, callback_args=(sent,),
                             errback_args=(sent,))

    def _ok(self, rows: Any, sent: float) -> None:
        with self._lock:
            self._pending -= 1
            self.queries += 1
            self.rows += len(rows)
            self.latencies_ms.append((time.monotonic() - sent) * 1000)
        self._send()

    def _failed(self, exc: BaseException, sent: float) -> None:
        with self._lock:
            self._pending -= 1
            self.errors += 1
            if self.first_error is None:
                self.first_error = f"{type(exc).__name__}: {exc}"
        self._send()


# =========================================================================================
# Redis
# =========================================================================================


def redis_ceilings(
    port: int, requests: int = 200_000, *, host: str = "127.0.0.1"
) -> dict[str, Any]:
    """``redis-benchmark --csv -q -c 50 -n requests -r 10000000`` against host:port for
    ``XADD bench:ceiling:stream * f v`` and ``SET bench:ceiling:set:__rand_int__ v NX``,
    without and with pipelining (``-P 16``). Every ``bench:ceiling:*`` key is deleted before
    and after.

    Returns ops/s as flat numbers, ``{"xadd": .., "xadd_pipeline16": .., "set_nx": ..,
    "set_nx_pipeline16": .., "details": {...}}``; the details hold the commands, the latency
    columns of the CSV and the server's persistence settings (AOF and RDB snapshots are part of
    the ceiling: they cost the server time)."""
    binary = redis_benchmark_binary()
    client = redis.Redis(host=host, port=port, socket_timeout=60)
    commands = {
        "xadd": ["XADD", f"{REDIS_PREFIX}stream", "*", "f", "v"],
        "set_nx": ["SET", f"{REDIS_PREFIX}set:__rand_int__", "v", "NX"],
        # What every inbox read asks (feedsvc/queue/notices_redis.py): two versions.
        "mget2": ["MGET", f"{REDIS_PREFIX}rv:__rand_int__", f"{REDIS_PREFIX}rv:pullset"],
    }
    out: dict[str, Any] = {}
    details: dict[str, Any] = {"clients": REDIS_CLIENTS, "requests": requests,
                               "random_keys": REDIS_RANDOM_KEYS, "commands": {},
                               "latency_ms": {}}
    try:
        details["redis_version"] = client.info("server").get("redis_version")
        details["persistence"] = {k: client.config_get(k).get(k)
                                  for k in ("appendonly", "appendfsync", "save")}
        _delete_prefix(client, REDIS_PREFIX)
        details["settle"] = {}
        for name, argv in commands.items():
            for pipeline in (1, REDIS_PIPELINE):
                key = name if pipeline == 1 else f"{name}_pipeline{pipeline}"
                details["settle"][key] = settle()
                details["commands"][key] = f"{' '.join(argv)} (-P {pipeline})"
                _progress(f"redis: {details['commands'][key]}")
                row = _redis_benchmark(binary, host, port, argv, requests, pipeline)
                out[key] = row["rps"]
                details["latency_ms"][key] = {k.removesuffix("_latency_ms"): v
                                              for k, v in row.items() if k != "rps"}
    finally:
        details["deleted_keys"] = _delete_prefix(client, REDIS_PREFIX)
        client.close()
    out["details"] = details
    return out


def redis_benchmark_binary() -> str:
    """Path of Debian's redis-benchmark; installs ``redis-tools`` when missing and root."""
    found = shutil.which("redis-benchmark")
    if found is None and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        _progress("redis-benchmark missing: apt-get install redis-tools")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "--no-install-recommends", "redis-tools"]
        if subprocess.run(install, env=env, check=False, timeout=600).returncode != 0:
            subprocess.run(["apt-get", "update"], env=env, check=False, timeout=600)
            subprocess.run(install, env=env, check=True, timeout=600)
        found = shutil.which("redis-benchmark")
    if found is None:
        raise RuntimeError("redis-benchmark not found (Debian package redis-tools)")
    return found


def _redis_benchmark(
    binary: str, host: str, port: int, argv: Sequence[str], requests: int, pipeline: int
) -> dict[str, float]:
    cmd = [binary, "-h", host, "-p", str(port), "-c", str(REDIS_CLIENTS), "-n", str(requests),
           "-r", str(REDIS_RANDOM_KEYS), "-P", str(pipeline), "--csv", "-q", *argv]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          timeout=60 + requests / 1_000)
    rows = list(csv.reader(io.StringIO(done.stdout)))
    if done.returncode != 0 or len(rows) < 2 or rows[0][:2] != ["test", "rps"]:
        raise RuntimeError(f"redis-benchmark failed ({done.returncode}): "
                           f"{done.stdout.strip()} {done.stderr.strip()}")
    header, values = rows[0], rows[1]
    return {name: float(value) for name, value in zip(header[1:], values[1:], strict=True)}


def _delete_prefix(client: redis.Redis, prefix: str) -> int:
    deleted = 0
    keys: list[bytes] = []
    for key in client.scan_iter(match=f"{prefix}*", count=1_000):
        keys.append(key)
        if len(keys) >= 1_000:
            deleted += int(client.delete(*keys))
            keys.clear()
    if keys:
        deleted += int(client.delete(*keys))
    return deleted


# =========================================================================================
# aiohttp
# =========================================================================================


def aiohttp_noop_ceiling(
    connections: int = 64, duration_s: float = 10.0, *, warmup_s: float = 1.0
) -> dict[str, Any]:
    """Requests/s of ``GET /noop`` on ``loadtest.noop_server`` (a subprocess on a free port)
    under ``run_load_in_process``; the LoadResult as a dict, plus the server's CPU use in
    percent of one core (median over 0.5 s samples while the load ran)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/noop"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryFile() as server_log:
        server = subprocess.Popen(
            [sys.executable, "-m", "loadtest.noop_server", "--host", "127.0.0.1",
             "--port", str(port)],
            cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=server_log,
        )
        try:
            _wait_until_answers(url, server, server_log, timeout_s=30.0)
            quiet = settle()
            _progress(f"aiohttp: GET /noop, {connections} connections, {duration_s:g} s")
            with _CpuSampler(server.pid) as sampler:
                result = run_load_in_process(RequestPlan.get(url), connections=connections,
                                             duration_s=duration_s, warmup_s=warmup_s)
        finally:
            _stop(server)
    out = result.to_dict()
    out.update(url="GET /noop", aiohttp_version=aiohttp.__version__,
               server_cpu_pct=sampler.process_pct(), machine_busy_pct=sampler.machine_pct(),
               settle=quiet)
    return out


def aiohttp_noop_wrk_ceiling(connections: int = 16, duration_s: float = 10.0
                             ) -> dict[str, Any]:
    """The no-op handler (``loadtest.noop_server``) under ``wrk`` (``loadtest.wrk``): the
    server's ceiling rather than the Python client's."""
    from loadtest.wrk import run_wrk

    port = free_port()
    url = f"http://127.0.0.1:{port}/noop"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryFile() as server_log:
        server = subprocess.Popen(
            [sys.executable, "-m", "loadtest.noop_server", "--host", "127.0.0.1",
             "--port", str(port)],
            cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=server_log,
        )
        try:
            _wait_until_answers(url, server, server_log, timeout_s=30.0)
            quiet = settle()
            _progress(f"aiohttp: GET /noop under wrk, {connections} connections, "
                      f"{duration_s:g} s")
            with _CpuSampler(server.pid) as sampler:
                out = run_wrk(f"http://127.0.0.1:{port}", [("/noop", {})],
                              connections=connections, duration_s=duration_s)
        finally:
            _stop(server)
    out.update(url="GET /noop", server_cpu_pct=sampler.process_pct(),
               machine_busy_pct=sampler.machine_pct(), settle=quiet)
    return out


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_until_answers(
    url: str, server: subprocess.Popen[bytes], server_log: Any, *, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            server_log.seek(0)
            text = server_log.read().decode(errors="replace")
            raise RuntimeError(f"noop server exited with {server.returncode}: {text}")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"noop server did not answer {url} within {timeout_s:g} s")


def _stop(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


class _CpuSampler:
    """Samples a process's and the machine's CPU use every ``interval_s`` in a thread."""

    def __init__(self, pid: int, interval_s: float = 0.5) -> None:
        self._pid = pid
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._process: list[float] = []
        self._machine: list[float] = []

    def __enter__(self) -> _CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        last = (time.monotonic(), _process_cpu_ticks(self._pid), machine_cpu())
        while not self._stop.wait(self._interval):
            now = (time.monotonic(), _process_cpu_ticks(self._pid), machine_cpu())
            if now[1] is not None and last[1] is not None:
                self._process.append(100.0 * (now[1] - last[1]) / tick / (now[0] - last[0]))
            busy = busy_pct(last[2], now[2])
            if busy is not None:
                self._machine.append(busy)
            last = now

    def process_pct(self) -> float | None:
        return round(statistics.median(self._process), 1) if self._process else None

    def machine_pct(self) -> float | None:
        return round(statistics.median(self._machine), 1) if self._machine else None


def settle(
    max_wait_s: float = 20.0, quiet_below_pct: float = 15.0, window_s: float = 0.5
) -> dict[str, Any]:
    """Wait (at most ``max_wait_s``) until the machine is quiet: under ``quiet_below_pct`` of
    all cores busy over a ``window_s`` window, so background work left by the previous run
    (Cassandra flushes and compactions, JIT, GC) is not charged to the next one. Returns how
    long it waited, the last reading and whether the machine did settle."""
    began = time.monotonic()
    while True:
        before = machine_cpu()
        time.sleep(window_s)
        busy = busy_pct(before, machine_cpu())
        waited = round(time.monotonic() - began, 1)
        if busy is None or busy < quiet_below_pct:
            return {"waited_s": waited, "busy_pct": busy, "settled": True}
        if waited >= max_wait_s:
            _progress(f"machine still {busy}% busy after {waited} s; measuring anyway")
            return {"waited_s": waited, "busy_pct": busy, "settled": False}


def _process_cpu_ticks(pid: int) -> int | None:
    """utime + stime of a process, in clock ticks (Linux /proc; None elsewhere)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])


def machine_cpu() -> tuple[int, int] | None:
    """(busy, total) jiffies of all cores since boot (Linux /proc/stat; None elsewhere)."""
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    values = [int(v) for v in first[1:9]]  # user nice system idle iowait irq softirq steal
    return sum(values) - values[3] - values[4], sum(values)


def busy_pct(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """Share of all cores busy between two ``machine_cpu`` readings, in percent."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return round(100.0 * (after[0] - before[0]) / (after[1] - before[1]), 1)


# =========================================================================================
# command line
# =========================================================================================


def _check_name(name: str) -> None:
    if not _NAME_RE.match(name):
        raise ValueError(f"not a valid CQL identifier: {name!r}")


def _progress(message: str) -> None:
    print(f"[ceilings] {message}", file=sys.stderr, flush=True)


def _machine() -> dict[str, Any]:
    memory = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        meminfo = Path("/proc/meminfo").read_text().split("\n", 1)[0].split()
        memory = round(int(meminfo[1]) / 1024 / 1024, 1)
    return {"cpus": os.cpu_count(), "memory_gib": memory, "python": platform.python_version(),
            "platform": platform.platform()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.ceilings",
        description="Measure the raw ceilings of this machine (Cassandra inserts, Redis ops, "
                    "a no-op aiohttp handler) and print them as JSON.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="fewer rows and requests, shorter runs (about a minute in all)")
    parser.add_argument("--hosts", default="127.0.0.1:19042",
                        help="Cassandra contact points, comma-separated host:port")
    parser.add_argument("--redis-port", type=int, default=16379)
    parser.add_argument("--keyspace", default="feedsvc_bench")
    parser.add_argument("--only", action="append", choices=("cassandra", "redis", "http"),
                        help="run only these measurements (repeatable; default all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    only = set(args.only or ("cassandra", "redis", "http"))
    if args.quick:
        settings = {"cassandra_rows": 60_000, "redis_requests": 50_000,
                    "http_connections": 64, "http_duration_s": 3.0, "http_warmup_s": 1.0}
    else:
        settings = {"cassandra_rows": 200_000, "redis_requests": 200_000,
                    "http_connections": 64, "http_duration_s": 10.0, "http_warmup_s": 2.0}

    out: dict[str, Any] = {"machine": _machine(), "quick": args.quick, "settings": settings}
    failed = False
    began = time.monotonic()
    def cassandra() -> dict[str, Any]:
        create_keyspace(hosts, args.keyspace)
        return cassandra_insert_ceiling(hosts, args.keyspace,
                                        rows=int(settings["cassandra_rows"]))

    def reads() -> dict[str, Any]:
        create_keyspace(hosts, args.keyspace)
        return cassandra_read_ceiling(hosts, args.keyspace,
                                      duration_s=float(settings["http_duration_s"]))

    measurements: list[tuple[str, str, Callable[[], dict[str, Any]]]] = [
        ("cassandra", "cassandra_insert", cassandra),
        ("cassandra", "cassandra_read", reads),
        ("redis", "redis",
         lambda: redis_ceilings(args.redis_port, int(settings["redis_requests"]))),
        ("http", "aiohttp_noop", lambda: aiohttp_noop_ceiling(
            int(settings["http_connections"]), float(settings["http_duration_s"]),
            warmup_s=float(settings["http_warmup_s"]))),
        ("http", "aiohttp_noop_wrk", lambda: aiohttp_noop_wrk_ceiling(
            16, float(settings["http_duration_s"]))),
    ]
    for name, key, measure in measurements:
        if name not in only:
            continue
        try:
            out[key] = measure()
        except Exception as exc:
            log.exception("%s ceiling failed", name)
            out[key] = {"error": f"{type(exc).__name__}: {exc}"}
            failed = True
    out["elapsed_s"] = round(time.monotonic() - began, 1)
    print(json.dumps(out, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
