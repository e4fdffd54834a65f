"""Embedded store: one SQLite file under ``FEEDSVC_DATA_DIR``.

For development, demos and small single-node installs. It implements the same ``Store``
port as Cassandra and passes the same contract suite. All calls run on one dedicated
thread (SQLite connections are not shared across threads), so the event loop never blocks.
Retention is enforced by ``expires_at`` columns filtered on read and purged by ``purge``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import msgspec

from feedsvc import metrics
from feedsvc.clock import now_ms
from feedsvc.model import Event, InboxItem, Mode, Position
from feedsvc.sqlite_file import SqliteFile
from feedsvc.store.base import OutboxRow, outbox_bucket, outbox_ttl

_SCHEMA = """
PRAGMA journal_mode=WAL;
PRAGMA synchronous=NORMAL;
CREATE TABLE IF NOT EXISTS events_by_id (
    event_id TEXT PRIMARY KEY, body BLOB NOT NULL, enqueued INTEGER NOT NULL DEFAULT 0,
    expires_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS events_by_author (
    author_id TEXT NOT NULL, created_at INTEGER NOT NULL, event_id TEXT NOT NULL,
    item BLOB NOT NULL, expires_at INTEGER NOT NULL,
    PRIMARY KEY (author_id, created_at, event_id));
CREATE TABLE IF NOT EXISTS pull_authors (
    author_id TEXT PRIMARY KEY, last_pull INTEGER NOT NULL, expires_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS inbox_by_user (
    user_id TEXT NOT NULL, created_at INTEGER NOT NULL, event_id TEXT NOT NULL,
    author_id TEXT NOT NULL, direct INTEGER NOT NULL, item BLOB NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (user_id, created_at, event_id));
CREATE TABLE IF NOT EXISTS follows (
    user_id TEXT NOT NULL, author_id TEXT NOT NULL, PRIMARY KEY (user_id, author_id));
CREATE INDEX IF NOT EXISTS followers_by_author ON follows (author_id, user_id);
CREATE TABLE IF NOT EXISTS author_modes (author_id TEXT PRIMARY KEY, mode TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outbox_by_bucket (
    bucket INTEGER NOT NULL, event_id TEXT NOT NULL, queued_at INTEGER,
    done INTEGER NOT NULL DEFAULT 0, expires_at INTEGER NOT NULL,
    PRIMARY KEY (bucket, event_id));
CREATE TABLE IF NOT EXISTS outbox_checkpoint (name TEXT PRIMARY KEY, bucket INTEGER NOT NULL);
"""

# Outbox upserts, parameters (bucket, event_id, expires_at, queued_at or None).
_OUTBOX_UPSERT = ("INSERT INTO outbox_by_bucket (bucket, event_id, expires_at, queued_at, done) "
                  "VALUES (?1, ?2, ?3, {queued}, {done}) ON CONFLICT (bucket, event_id) DO "
                  "UPDATE SET expires_at = max(expires_at, excluded.expires_at){update}")
_OUTBOX_RECORD = _OUTBOX_UPSERT.format(queued="?4", done="0", update="")
_OUTBOX_QUEUED = _OUTBOX_UPSERT.format(queued="?4", done="0",
                                       update=", queued_at = excluded.queued_at")
_OUTBOX_SETTLE = _OUTBOX_UPSERT.format(queued="?4", done="1", update=", done = 1")

_item_encoder = msgspec.msgpack.Encoder()
_item_decoder = msgspec.msgpack.Decoder(InboxItem)
_event_decoder = msgspec.msgpack.Decoder(Event)


@metrics.instrumented("sqlite")
class SqliteStore(SqliteFile):
    """``Store`` on one SQLite file; see the module docstring."""

    SCHEMA = _SCHEMA

    @classmethod
    async def open(cls, path: Path) -> SqliteStore:
        store = cls(path)
        await store._run(store._open)
        return store

    # --- events ------------------------------------------------------------------------

    async def insert_event(self, event: Event, ttl_s: int) -> Event | None:
        def insert() -> Event | None:
            now = now_ms()
            cur = self.db.execute(
                "INSERT INTO events_by_id (event_id, body, expires_at) VALUES (?, ?, ?) "
                "ON CONFLICT (event_id) DO UPDATE SET body = excluded.body, enqueued = 0, "
                "expires_at = excluded.expires_at WHERE events_by_id.expires_at <= ?",
                (event.event_id, _item_encoder.encode(event), now + ttl_s * 1000, now),
            )
            if cur.rowcount == 1:
                return None
            row = self.db.execute(
                "SELECT body FROM events_by_id WHERE event_id = ?", (event.event_id,)
            ).fetchone()
            return _event_decoder.decode(row[0])

        return await self._run(insert)

    async def get_event(self, event_id: str) -> Event | None:
        row = await self._run(
            lambda: self.db.execute(
                "SELECT body FROM events_by_id WHERE event_id = ? AND expires_at > ?",
                (event_id, now_ms()),
            ).fetchone()
        )
        return _event_decoder.decode(row[0]) if row else None

    # --- outbox (``Outbox``) -------------------------------------------------------------

    async def _outbox_upsert(self, sql: str, event_id: str, accepted_at: int, ttl_s: int,
                             queued_at: int | None = None) -> None:
        expires = now_ms() + outbox_ttl(ttl_s) * 1000
        await self._run(self.db.execute, sql,
                        (outbox_bucket(accepted_at), event_id, expires, queued_at))

    async def record(self, event_id: str, accepted_at: int, ttl_s: int) -> None:
        await self._outbox_upsert(_OUTBOX_RECORD, event_id, accepted_at, ttl_s)

    async def mark_queued(self, event_id: str, accepted_at: int, queued_at: int,
                          ttl_s: int) -> None:
        await self._outbox_upsert(_OUTBOX_QUEUED, event_id, accepted_at, ttl_s, queued_at)

    async def settle(self, event_id: str, accepted_at: int, ttl_s: int) -> None:
        await self._outbox_upsert(_OUTBOX_SETTLE, event_id, accepted_at, ttl_s)

    async def outbox_row(self, event_id: str, accepted_at: int) -> OutboxRow | None:
        rows = await self._outbox_rows("AND event_id = ?", outbox_bucket(accepted_at),
                                       event_id)
        return rows[0] if rows else None

    async def outbox_bucket(self, bucket: int) -> list[OutboxRow]:
        return await self._outbox_rows("", bucket)

    async def _outbox_rows(self, where: str, bucket: int, *params: Any) -> list[OutboxRow]:
        rows = await self._run(lambda: self.db.execute(
            "SELECT event_id, queued_at, done FROM outbox_by_bucket WHERE bucket = ? "
            f"{where} AND expires_at > ? ORDER BY event_id", (bucket, *params, now_ms()),
        ).fetchall())
        return [OutboxRow(event_id, queued_at, bool(done)) for event_id, queued_at, done in rows]

    async def sweep_checkpoint(self) -> int | None:
        row = await self._run(lambda: self.db.execute(
            "SELECT bucket FROM outbox_checkpoint WHERE name = 'fanout'").fetchone())
        return int(row[0]) if row else None

    async def set_sweep_checkpoint(self, bucket: int) -> None:
        await self._run(self.db.execute,
                        "INSERT OR REPLACE INTO outbox_checkpoint VALUES ('fanout', ?)", (bucket,))

    async def put_author_event(self, item: InboxItem, ttl_s: int) -> None:
        await self._run(
            self.db.execute,
            "INSERT OR REPLACE INTO events_by_author VALUES (?, ?, ?, ?, ?)",
            (item.author_id, item.created_at, item.event_id, _item_encoder.encode(item),
             now_ms() + ttl_s * 1000),
        )

    async def author_events(
        self, author_id: str, before: Position | None, limit: int, since_ms: int
    ) -> list[InboxItem]:
        def query() -> list[InboxItem]:
            sql = (
                "SELECT item FROM events_by_author WHERE author_id = ? AND created_at >= ? "
                "AND expires_at > ?"
            )
            params: list[Any] = [author_id, since_ms, now_ms()]
            if before is not None:
                sql += " AND (created_at, event_id) < (?, ?)"
                params += [before.created_at, before.event_id]
            sql += " ORDER BY created_at DESC, event_id DESC LIMIT ?"
            params.append(limit)
            return [_item_decoder.decode(r[0]) for r in self.db.execute(sql, params)]

        return await self._run(query)

    async def touch_pull_author(self, author_id: str, ttl_s: int) -> None:
        now = now_ms()
        await self._run(
            self.db.execute,
            "INSERT INTO pull_authors VALUES (?, ?, ?) ON CONFLICT (author_id) DO UPDATE SET "
            "last_pull = excluded.last_pull, expires_at = excluded.expires_at",
            (author_id, now, now + ttl_s * 1000),
        )

    async def pull_authors(self) -> dict[str, int]:
        rows = await self._run(
            lambda: self.db.execute(
                "SELECT author_id, last_pull FROM pull_authors WHERE expires_at > ?",
                (now_ms(),),
            ).fetchall()
        )
        return {a: t for a, t in rows}

    # --- inboxes -----------------------------------------------------------------------

    async def write_inbox(self, user_ids: Sequence[str], item: InboxItem, ttl_s: int) -> None:
        blob = _item_encoder.encode(item)
        expires = now_ms() + ttl_s * 1000
        rows = [
            (u, item.created_at, item.event_id, item.author_id, int(item.direct), blob, expires)
            for u in user_ids
        ]

        await self.write_many("INSERT OR REPLACE INTO inbox_by_user VALUES (?, ?, ?, ?, ?, ?, ?)",
                              rows)

    async def read_inbox(
        self, user_id: str, before: Position | None, limit: int
    ) -> list[InboxItem]:
        def query() -> list[InboxItem]:
            sql = "SELECT item FROM inbox_by_user WHERE user_id = ? AND expires_at > ?"
            params: list[Any] = [user_id, now_ms()]
            if before is not None:
                sql += " AND (created_at, event_id) < (?, ?)"
                params += [before.created_at, before.event_id]
            sql += " ORDER BY created_at DESC, event_id DESC LIMIT ?"
            params.append(limit)
            return [_item_decoder.decode(r[0]) for r in self.db.execute(sql, params)]

        return await self._run(query)

    async def delete_inbox_author(self, user_id: str, author_id: str) -> int:
        cur = await self._run(
            self.db.execute,
            "DELETE FROM inbox_by_user WHERE user_id = ? AND author_id = ? AND direct = 0",
            (user_id, author_id),
        )
        return int(cur.rowcount)

    async def trim_inbox(self, user_id: str, keep: int) -> int:
        def trim() -> int:
            row = self.db.execute(
                "SELECT created_at, event_id FROM inbox_by_user WHERE user_id = ? "
                "ORDER BY created_at DESC, event_id DESC LIMIT 1 OFFSET ?",
                (user_id, keep - 1),
            ).fetchone()
            if row is None:
                return 0
            cur = self.db.execute(
                "DELETE FROM inbox_by_user WHERE user_id = ? AND (created_at, event_id) < (?, ?)",
                (user_id, row[0], row[1]),
            )
            return int(cur.rowcount)

        return await self._run(trim)

    async def purge(self) -> None:
        """Delete expired rows (the embedded stand-in for Cassandra's TTL)."""

        def purge() -> None:
            now = now_ms()
            with self.transaction():
                for table in ("events_by_id", "events_by_author", "pull_authors",
                              "inbox_by_user", "outbox_by_bucket"):
                    self.db.execute(f"DELETE FROM {table} WHERE expires_at <= ?", (now,))

        await self._run(purge)

    # --- follow graph ------------------------------------------------------------------

    async def follow(self, user_id: str, author_id: str) -> bool:
        cur = await self._run(
            self.db.execute, "INSERT OR IGNORE INTO follows VALUES (?, ?)", (user_id, author_id)
        )
        return bool(cur.rowcount == 1)

    async def unfollow(self, user_id: str, author_id: str) -> bool:
        cur = await self._run(
            self.db.execute, "DELETE FROM follows WHERE user_id = ? AND author_id = ?",
            (user_id, author_id),
        )
        return bool(cur.rowcount == 1)

    async def following_subset(self, user_id: str, author_ids: Sequence[str]) -> set[str]:
        ids = list(dict.fromkeys(author_ids))

        def query() -> set[str]:
            found: set[str] = set()
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                marks = ",".join("?" * len(chunk))
                found.update(
                    r[0] for r in self.db.execute(
                        f"SELECT author_id FROM follows WHERE user_id = ? "
                        f"AND author_id IN ({marks})", [user_id, *chunk],
                    )
                )
            return found

        return await self._run(query) if ids else set()

    async def _page(
        self, sql: str, key: str, after: str | None, limit: int
    ) -> tuple[list[str], str | None]:
        rows = await self._run(
            lambda: [r[0] for r in self.db.execute(sql, (key, after or "", limit + 1))]
        )
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, (rows[-1] if more else None)

    async def followers_page(
        self, author_id: str, after: str | None, limit: int
    ) -> tuple[list[str], str | None]:
        return await self._page(
            "SELECT user_id FROM follows WHERE author_id = ? AND user_id > ? "
            "ORDER BY user_id LIMIT ?", author_id, after, limit,
        )

    async def follower_pages(self, author_id: str, page_size: int) -> AsyncIterator[list[str]]:
        after: str | None = None
        while True:
            page, after = await self.followers_page(author_id, after, page_size)
            if page:
                yield page
            if after is None:
                return

    async def following_page(
        self, user_id: str, after: str | None, limit: int
    ) -> tuple[list[str], str | None]:
        return await self._page(
            "SELECT author_id FROM follows WHERE user_id = ? AND author_id > ? "
            "ORDER BY author_id LIMIT ?", user_id, after, limit,
        )

    async def counts(self, user_id: str) -> tuple[int, int]:
        def query() -> tuple[int, int]:
            followers = self.db.execute(
                "SELECT count(*) FROM follows WHERE author_id = ?", (user_id,)
            ).fetchone()[0]
            following = self.db.execute(
                "SELECT count(*) FROM follows WHERE user_id = ?", (user_id,)
            ).fetchone()[0]
            return int(followers), int(following)

        return await self._run(query)

    async def get_mode(self, author_id: str) -> Mode:
        row = await self._run(
            lambda: self.db.execute(
                "SELECT mode FROM author_modes WHERE author_id = ?", (author_id,)
            ).fetchone()
        )
        return "pull" if row and row[0] == "pull" else "push"

    async def set_mode(self, author_id: str, mode: Mode) -> None:
        await self._run(
            self.db.execute, "INSERT OR REPLACE INTO author_modes VALUES (?, ?)",
            (author_id, mode),
        )
