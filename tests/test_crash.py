"""Crash safety with a real process kill: a worker SIGKILLed in the middle of a
5,000-follower fan-out (20,000 on the embedded backend), then a new worker, leave exactly
one inbox row per follower."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import pytest

from feedsvc import intake
from feedsvc.config import Settings
from feedsvc.model import FOLLOWER_PAGE
from feedsvc.runtime import Runtime
from feedsvc.seed import write_graph
from feedsvc.store.sqlite import SqliteStore
from tests.conftest import MakeRuntime
from tests.procs import process_env

FOLLOWERS = 5_000
EMBEDDED_FOLLOWERS = 20_000


def worker_env(settings: Settings) -> dict[str, str]:
    # Few writes in flight, so the kill lands mid fan-out.
    return process_env(settings, FEEDSVC_FANOUT_CONCURRENCY="1")


def start_worker(settings: Settings, log: IO[bytes], *extra: str,
                 niceness: int = 0) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "feedsvc.cli", "--log-level", "WARNING", "worker",
         "--processes", "1", "--concurrency", "1", *extra],
        env=worker_env(settings), stdout=log, stderr=subprocess.STDOUT,
        preexec_fn=(lambda: os.nice(niceness)) if niceness else None,
    )


async def count_rows(rt: Runtime, users: list[str], event_id: str) -> list[int]:
    limit = asyncio.Semaphore(64)

    async def one(user: str) -> int:
        async with limit:
            rows = await rt.store.read_inbox(user, None, 100)
        return sum(r.event_id == event_id for r in rows)

    return list(await asyncio.gather(*(one(u) for u in users)))


def kill_at_first_sqlite_page(path: Path, worker: subprocess.Popen[bytes],
                              event_id: str, author: str, log_path: Path) -> None:
    """Kill the embedded worker once its first page of rows is committed. It commits a page
    of 1,000 rows in a few milliseconds, so the file is polled directly (read only: in WAL
    mode a reader never waits for the writer, where a look under the write lock could be
    kept waiting by SQLite's busy backoff while every page went in), every millisecond."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60,
                           isolation_level=None)
    try:
        deadline = time.monotonic() + 120
        while True:
            (rows,) = conn.execute(
                "SELECT count(*) FROM inbox_by_user WHERE event_id = ? AND user_id != ?",
                (event_id, author)).fetchone()
            if rows:
                worker.send_signal(signal.SIGKILL)
                worker.wait()
                return
            assert worker.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "the worker never started writing"
            time.sleep(0.001)
    finally:
        conn.close()


@pytest.mark.slow
async def test_sigkill_mid_fanout_then_restart(
    make_runtime: MakeRuntime, prefix: str, tmp_path: Path
) -> None:
    rt = await make_runtime(celebrity_threshold=100_000, claim_idle=1.0)
    sqlite_file = rt.store.path if isinstance(rt.store, SqliteStore) else None
    # The embedded worker writes 5,000 rows in well under 100 ms: more pages give the poll
    # room to land between two of them on a busy machine.
    followers = FOLLOWERS if sqlite_file is None else EMBEDDED_FOLLOWERS
    author = f"{prefix}-author"
    fans = [f"{prefix}-f{i:05d}" for i in range(followers)]
    await write_graph(rt, iter([(f, author) for f in fans]), progress=False)
    status, accepted = await intake.accept(rt, json.dumps({
        "event_id": f"{prefix}-big", "author_id": author, "kind": "post", "payload": {"n": 1},
    }).encode())
    assert (status, accepted.route) == (202, "push")
    event_id = accepted.event_id
    first_page, _ = await rt.store.followers_page(author, None, FOLLOWER_PAGE)
    probe = first_page[:: len(first_page) // 20][:20]

    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        # The lowest CPU priority: on a busy machine the watcher, not the victim, gets the
        # core, so the kill lands between pages.
        worker = start_worker(rt.settings, log, niceness=19)
        try:
            if sqlite_file is not None:
                await asyncio.to_thread(kill_at_first_sqlite_page, sqlite_file, worker,
                                        event_id, author, log_path)
            else:
                deadline = time.monotonic() + 120
                while sum(await count_rows(rt, probe, event_id)) == 0:
                    assert worker.poll() is None, log_path.read_text()
                    assert time.monotonic() < deadline, "the worker never started writing"
                    await asyncio.sleep(0.02)
            worker.send_signal(signal.SIGKILL)
        finally:
            worker.kill()
            worker.wait()
    assert worker.returncode == -signal.SIGKILL
    partial = await count_rows(rt, fans, event_id)
    assert 0 < sum(partial) < followers, "the kill did not land mid fan-out"
    assert (await rt.queue.stats()).depth["medium"] == 1  # still pending, not lost

    await asyncio.sleep(rt.settings.claim_idle + 0.5)  # the dead consumer's entry goes idle
    with log_path.open("ab") as log:
        survivor = start_worker(rt.settings, log, "--burst")
        await asyncio.to_thread(survivor.wait, timeout=240)
    assert survivor.returncode == 0, log_path.read_text()

    assert await count_rows(rt, fans, event_id) == [1] * followers
    assert await count_rows(rt, [author], event_id) == [1]
    assert (await rt.queue.stats()).depth == {"high": 0, "medium": 0, "low": 0}
