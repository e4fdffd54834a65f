"""One SQLite file served by one dedicated thread: the base of the embedded store and
queue. SQLite connections are not shared across threads and its calls block, so every
call runs on the file's own thread and the event loop never waits on disk."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from feedsvc.errors import RetryableError

T = TypeVar("T")


class SqliteFile:
    SCHEMA = ""  # executed when the file is opened

    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1,
                                            thread_name_prefix=f"feedsvc-{path.stem}")
        self._conn: sqlite3.Connection | None = None

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.executescript(self.SCHEMA)
        self._conn = conn

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except sqlite3.OperationalError as exc:
            raise RetryableError(f"sqlite {self.path.name}: {exc}") from exc

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on an error), on the file's thread.
        The connection is in autocommit mode (``isolation_level=None``), where ``with
        db:`` would start no transaction at all."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    async def write_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """``sql`` once per row, in one transaction on the file's thread (none for no rows)."""
        def write() -> None:
            with self.transaction():
                self.db.executemany(sql, rows)

        if rows:
            await self._run(write)

    @property
    def db(self) -> sqlite3.Connection:
        assert self._conn is not None, f"{self.path.name} is not open"
        return self._conn

    async def ping(self) -> None:
        await self._run(lambda: self.db.execute("SELECT 1").fetchone())

    async def close(self) -> None:
        if self._conn is not None:
            await self._run(self.db.close)
            self._conn = None
        self._executor.shutdown(wait=True)
