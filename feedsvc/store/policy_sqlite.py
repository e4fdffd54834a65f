"""Provider message ids, seen webhooks, read marks and erasure in the embedded SQLite file:
the ports of ``feedsvc/store/policy.py``, on the embedded store's connection and thread.
Rows with a lifetime carry ``expires_at`` (filtered on read), as the store's do."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from feedsvc.clock import now_ms
from feedsvc.model import Position
from feedsvc.store.policy import ErasureStatus, SentRef
from feedsvc.store.sqlite import SqliteStore

_SCHEMA = """
CREATE TABLE IF NOT EXISTS delivery_by_provider_id (
    provider TEXT NOT NULL, message_id TEXT NOT NULL, user_id TEXT NOT NULL,
    body BLOB NOT NULL, expires_at INTEGER NOT NULL, PRIMARY KEY (provider, message_id));
CREATE INDEX IF NOT EXISTS provider_ids_by_user ON delivery_by_provider_id (user_id);
CREATE TABLE IF NOT EXISTS webhooks_seen (
    provider TEXT NOT NULL, webhook_id TEXT NOT NULL, expires_at INTEGER NOT NULL,
    PRIMARY KEY (provider, webhook_id));
CREATE TABLE IF NOT EXISTS read_state_by_user (
    user_id TEXT PRIMARY KEY, created_at INTEGER NOT NULL, event_id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS erased_users (user_id TEXT PRIMARY KEY, erased_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS direct_events_by_author (
    author_id TEXT NOT NULL, created_at INTEGER NOT NULL, event_id TEXT NOT NULL,
    expires_at INTEGER NOT NULL, PRIMARY KEY (author_id, created_at, event_id));
CREATE TABLE IF NOT EXISTS erasures_pending (user_id TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS erasures_by_user (user_id TEXT PRIMARY KEY, body BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS deliveries_by_user ON deliveries_by_recipient (user_id, event_id);
"""

_encoder = msgspec.msgpack.Encoder()
_ref = msgspec.msgpack.Decoder(SentRef)
_status = msgspec.msgpack.Decoder(ErasureStatus)


class SqlitePolicyStore:
    """Every port of ``feedsvc/store/policy.py`` on the embedded file."""

    def __init__(self, store: SqliteStore) -> None:
        self.store = store

    @classmethod
    async def open(cls, store: SqliteStore) -> SqlitePolicyStore:
        # After the delivery log's schema (``SqliteDeliveryStore.open``): it indexes it.
        await store._run(store.db.executescript, _SCHEMA)
        return cls(store)

    async def _exec(self, sql: str, *params: Any) -> int:
        cur = await self.store._run(self.store.db.execute, sql, params)
        return int(cur.rowcount)

    async def _all(self, sql: str, *params: Any) -> list[Any]:
        return await self.store._run(lambda: self.store.db.execute(sql, params).fetchall())

    # --- ProviderIds --------------------------------------------------------------------

    async def remember_many(self, sent: Sequence[tuple[str, str, SentRef]],
                            ttl_s: int) -> None:
        expires = now_ms() + max(1, ttl_s) * 1000
        await self.store.write_many(
            "INSERT OR REPLACE INTO delivery_by_provider_id VALUES (?, ?, ?, ?, ?)",
            [(provider, message_id, ref.user_id, _encoder.encode(ref), expires)
             for provider, message_id, ref in sent])

    async def find(self, provider: str, message_id: str) -> SentRef | None:
        rows = await self._all("SELECT body FROM delivery_by_provider_id WHERE provider = ? "
                               "AND message_id = ? AND expires_at > ?", provider, message_id,
                               now_ms())
        return _ref.decode(rows[0][0]) if rows else None

    async def forget_user(self, user_id: str) -> int:
        return await self._exec("DELETE FROM delivery_by_provider_id WHERE user_id = ?",
                                user_id)

    # --- SeenWebhooks -------------------------------------------------------------------

    async def claim(self, provider: str, webhook_id: str, ttl_s: int) -> bool:
        now = now_ms()
        changed = await self._exec(
            "INSERT INTO webhooks_seen VALUES (?, ?, ?) ON CONFLICT (provider, webhook_id) "
            "DO UPDATE SET expires_at = excluded.expires_at WHERE webhooks_seen.expires_at <= ?",
            provider, webhook_id, now + max(1, ttl_s) * 1000, now)
        return changed == 1

    async def forget(self, provider: str, webhook_id: str) -> None:
        await self._exec("DELETE FROM webhooks_seen WHERE provider = ? AND webhook_id = ?",
                         provider, webhook_id)

    # --- ReadMarks ----------------------------------------------------------------------

    async def seen(self, user_id: str) -> Position | None:
        rows = await self._all("SELECT created_at, event_id FROM read_state_by_user WHERE "
                               "user_id = ?", user_id)
        return Position(rows[0][0], rows[0][1]) if rows else None

    async def mark_seen(self, user_id: str, position: Position) -> None:
        await self._exec("INSERT OR REPLACE INTO read_state_by_user VALUES (?, ?, ?)",
                         user_id, position.created_at, position.event_id)

    async def forget_seen(self, user_id: str) -> None:
        await self._exec("DELETE FROM read_state_by_user WHERE user_id = ?", user_id)

    # --- Erasures -----------------------------------------------------------------------

    async def tombstone(self, user_id: str, erased_at: int) -> None:
        await self._exec("INSERT OR IGNORE INTO erased_users VALUES (?, ?)", user_id,
                         erased_at)

    async def erased(self) -> dict[str, int]:
        return {u: t for u, t in await self._all("SELECT user_id, erased_at FROM erased_users")}

    async def status(self, user_id: str) -> ErasureStatus | None:
        rows = await self._all("SELECT body FROM erasures_by_user WHERE user_id = ?", user_id)
        return _status.decode(rows[0][0]) if rows else None

    async def set_pending(self, user_id: str, pending: bool) -> None:
        if pending:
            await self._exec("INSERT OR IGNORE INTO erasures_pending VALUES (?)", user_id)
        else:
            await self._exec("DELETE FROM erasures_pending WHERE user_id = ?", user_id)

    async def pending(self) -> list[str]:
        return [r[0] for r in await self._all("SELECT user_id FROM erasures_pending")]

    async def put_status(self, status: ErasureStatus) -> None:
        await self._exec("INSERT OR REPLACE INTO erasures_by_user VALUES (?, ?)",
                         status.user_id, _encoder.encode(status))

    async def delete_contacts_and_preferences(self, user_id: str) -> None:
        def delete() -> None:
            with self.store.transaction() as db:
                db.execute("DELETE FROM contacts_by_user WHERE user_id = ?", (user_id,))
                db.execute("DELETE FROM preferences_by_user WHERE user_id = ?", (user_id,))

        await self.store._run(delete)

    async def delete_inbox(self, user_id: str) -> None:
        await self._exec("DELETE FROM inbox_by_user WHERE user_id = ?", user_id)

    async def delete_event(self, author_id: str, created_at: int, event_id: str) -> None:
        def delete() -> None:
            with self.store.transaction() as db:
                db.execute("DELETE FROM events_by_author WHERE author_id = ? AND "
                           "created_at = ? AND event_id = ?", (author_id, created_at, event_id))
                db.execute("DELETE FROM events_by_id WHERE event_id = ?", (event_id,))

        await self.store._run(delete)

    async def index_direct(self, author_id: str, created_at: int, event_id: str,
                           ttl_s: int) -> None:
        await self._exec("INSERT OR REPLACE INTO direct_events_by_author VALUES (?, ?, ?, ?)",
                         author_id, created_at, event_id, now_ms() + max(1, ttl_s) * 1000)

    async def direct_events(self, author_id: str, limit: int) -> list[Position]:
        rows = await self._all("SELECT created_at, event_id FROM direct_events_by_author "
                               "WHERE author_id = ? LIMIT ?", author_id, limit)
        return [Position(t, e) for t, e in rows]

    async def delete_direct(self, author_id: str, created_at: int, event_id: str) -> None:
        def delete() -> None:
            with self.store.transaction() as db:
                db.execute("DELETE FROM events_by_id WHERE event_id = ?", (event_id,))
                db.execute("DELETE FROM direct_events_by_author WHERE author_id = ? AND "
                           "created_at = ? AND event_id = ?", (author_id, created_at, event_id))

        await self.store._run(delete)

    async def delete_inbox_row(self, user_id: str, created_at: int, event_id: str) -> None:
        await self._exec("DELETE FROM inbox_by_user WHERE user_id = ? AND created_at = ? AND "
                         "event_id = ?", user_id, created_at, event_id)

    async def delivery_events(self, user_id: str, limit: int) -> list[str]:
        rows = await self._all("SELECT DISTINCT event_id FROM deliveries_by_recipient WHERE "
                               "user_id = ? LIMIT ?", user_id, limit)
        return [r[0] for r in rows]

    async def delete_deliveries(self, user_id: str, event_id: str) -> None:
        await self._exec("DELETE FROM deliveries_by_recipient WHERE event_id = ? AND "
                         "user_id = ?", event_id, user_id)
