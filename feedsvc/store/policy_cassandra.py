"""Provider message ids, seen webhooks, read marks and erasure on Cassandra
(``cql/005_receipts_reads_erasure.cql``): the ports of ``feedsvc/store/policy.py``, on the
feed store's session. Erasure's deletes of feed rows (an inbox, an author's event) are
here too, so the feed's ``Store`` keeps only what the feed needs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

import msgspec
from cassandra.query import PreparedStatement

from feedsvc.errors import RetryableError
from feedsvc.model import Position
from feedsvc.store.cassandra import CassandraStore, bucket_of
from feedsvc.store.policy import ErasureStatus, SentRef

_SHARD = 0  # erased_users is one partition

_STATEMENTS = {
    "remember": "INSERT INTO {ks}.delivery_by_provider_id (provider, message_id, body) "
                "VALUES (?, ?, ?) USING TTL ?",
    "remember_user": "INSERT INTO {ks}.provider_ids_by_user (user_id, provider, message_id) "
                     "VALUES (?, ?, ?) USING TTL ?",
    "find": "SELECT body FROM {ks}.delivery_by_provider_id WHERE provider = ? AND "
            "message_id = ?",
    "user_ids": "SELECT provider, message_id FROM {ks}.provider_ids_by_user WHERE "
                "user_id = ? LIMIT 1000",
    "forget_id": "DELETE FROM {ks}.delivery_by_provider_id WHERE provider = ? AND "
                 "message_id = ?",
    "forget_user_id": "DELETE FROM {ks}.provider_ids_by_user WHERE user_id = ? AND "
                      "provider = ? AND message_id = ?",
    "claim_webhook": "INSERT INTO {ks}.webhooks_seen (provider, webhook_id) VALUES (?, ?) "
                     "IF NOT EXISTS USING TTL ?",
    "forget_webhook": "DELETE FROM {ks}.webhooks_seen WHERE provider = ? AND webhook_id = ?",
    "seen": "SELECT created_at, event_id FROM {ks}.read_state_by_user WHERE user_id = ?",
    "mark_seen": "INSERT INTO {ks}.read_state_by_user (user_id, created_at, event_id) "
                 "VALUES (?, ?, ?)",
    "forget_seen": "DELETE FROM {ks}.read_state_by_user WHERE user_id = ?",
    "tombstone": "INSERT INTO {ks}.erased_users (shard, user_id, erased_at) VALUES (?, ?, ?)",
    "erased": "SELECT user_id, erased_at FROM {ks}.erased_users WHERE shard = ?",
    "add_pending": "INSERT INTO {ks}.erasures_pending (shard, user_id) VALUES (?, ?)",
    "drop_pending": "DELETE FROM {ks}.erasures_pending WHERE shard = ? AND user_id = ?",
    "pending": "SELECT user_id FROM {ks}.erasures_pending WHERE shard = ? LIMIT 10000",
    "status": "SELECT body FROM {ks}.erasures_by_user WHERE user_id = ?",
    "put_status": "INSERT INTO {ks}.erasures_by_user (user_id, body) VALUES (?, ?)",
    "delete_contacts": "DELETE FROM {ks}.contacts_by_user WHERE user_id = ?",
    "delete_preferences": "DELETE FROM {ks}.preferences_by_user WHERE user_id = ?",
    "delete_inbox": "DELETE FROM {ks}.inbox_by_user WHERE user_id = ?",
    "delete_author_event": "DELETE FROM {ks}.events_by_author WHERE author_id = ? AND "
                           "bucket = ? AND created_at = ? AND event_id = ?",
    "delete_event": "DELETE FROM {ks}.events_by_id WHERE event_id = ?",
    "index_direct": "INSERT INTO {ks}.direct_events_by_author (author_id, created_at, "
                    "event_id) VALUES (?, ?, ?) USING TTL ?",
    "direct_events": "SELECT created_at, event_id FROM {ks}.direct_events_by_author WHERE "
                     "author_id = ? LIMIT ?",
    "delete_direct": "DELETE FROM {ks}.direct_events_by_author WHERE author_id = ? AND "
                     "created_at = ? AND event_id = ?",
    "delete_inbox_row": "DELETE FROM {ks}.inbox_by_user WHERE user_id = ? AND created_at = ? "
                        "AND event_id = ?",
    "delivery_events": "SELECT event_id FROM {ks}.deliveries_by_user WHERE user_id = ? "
                       "LIMIT ?",
    "delete_deliveries": "DELETE FROM {ks}.deliveries_by_notification WHERE event_id = ? "
                         "AND user_id = ?",
    "delete_delivery_index": "DELETE FROM {ks}.deliveries_by_user WHERE user_id = ? AND "
                             "event_id = ?",
}

_encoder = msgspec.msgpack.Encoder()
_ref = msgspec.msgpack.Decoder(SentRef)
_status = msgspec.msgpack.Decoder(ErasureStatus)


class CassandraPolicyStore:
    """Every port of ``feedsvc/store/policy.py`` on Cassandra; see the module docstring."""

    def __init__(self, store: CassandraStore, statements: dict[str, PreparedStatement]) -> None:
        self.store, self._ps = store, statements

    @classmethod
    async def open(cls, store: CassandraStore) -> CassandraPolicyStore:
        return cls(store, await store.prepare(_STATEMENTS))

    async def _run(self, name: str, *params: object) -> list[tuple[object, ...]]:
        return await self.store.run(self._ps[name], *params)

    # --- ProviderIds --------------------------------------------------------------------

    async def remember_many(self, sent: Sequence[tuple[str, str, SentRef]],
                            ttl_s: int) -> None:
        """One unlogged batch: a row per message id and the recipients' index rows (a
        delivery's ids share one recipient, so that index is one partition)."""
        ttl = max(1, ttl_s)
        rows: list[tuple[PreparedStatement, Sequence[object]]] = []
        for provider, message_id, ref in sent:
            rows.append((self._ps["remember"], (provider, message_id, _encoder.encode(ref),
                                                ttl)))
            rows.append((self._ps["remember_user"], (ref.user_id, provider, message_id, ttl)))
        if rows:
            await self.store.run_batch(rows)

    async def find(self, provider: str, message_id: str) -> SentRef | None:
        rows = await self._run("find", provider, message_id)
        return _ref.decode(rows[0][0]) if rows else None  # type: ignore[arg-type]

    async def forget_user(self, user_id: str) -> int:
        removed = 0
        while rows := await self._run("user_ids", user_id):
            await asyncio.gather(*(self._forget_one(user_id, str(p), str(m))
                                   for p, m in rows))
            removed += len(rows)
        return removed

    async def _forget_one(self, user_id: str, provider: str, message_id: str) -> None:
        await self._run("forget_id", provider, message_id)
        await self._run("forget_user_id", user_id, provider, message_id)

    # --- SeenWebhooks -------------------------------------------------------------------

    async def claim(self, provider: str, webhook_id: str, ttl_s: int) -> bool:
        try:
            rows = await self._run("claim_webhook", provider, webhook_id, max(1, ttl_s))
        except RetryableError:
            # The claim may have been written all the same (an unsure lightweight
            # transaction): undo it, or the provider's retry would be taken for a duplicate.
            with contextlib.suppress(RetryableError):
                await self._run("forget_webhook", provider, webhook_id)
            raise
        return bool(rows[0][0])  # [applied]

    async def forget(self, provider: str, webhook_id: str) -> None:
        await self._run("forget_webhook", provider, webhook_id)

    # --- ReadMarks ----------------------------------------------------------------------

    async def seen(self, user_id: str) -> Position | None:
        rows = await self._run("seen", user_id)
        if not rows or rows[0][0] is None:
            return None
        return Position(int(rows[0][0]), str(rows[0][1]))  # type: ignore[call-overload]

    async def mark_seen(self, user_id: str, position: Position) -> None:
        await self._run("mark_seen", user_id, position.created_at, position.event_id)

    async def forget_seen(self, user_id: str) -> None:
        await self._run("forget_seen", user_id)

    # --- Erasures -----------------------------------------------------------------------

    async def tombstone(self, user_id: str, erased_at: int) -> None:
        await self._run("tombstone", _SHARD, user_id, erased_at)

    async def erased(self) -> dict[str, int]:
        rows = await self._run("erased", _SHARD)
        return {str(u): int(t) for u, t in rows}  # type: ignore[call-overload]

    async def status(self, user_id: str) -> ErasureStatus | None:
        rows = await self._run("status", user_id)
        return _status.decode(rows[0][0]) if rows else None  # type: ignore[arg-type]

    async def set_pending(self, user_id: str, pending: bool) -> None:
        await self._run("add_pending" if pending else "drop_pending", _SHARD, user_id)

    async def pending(self) -> list[str]:
        return [str(r[0]) for r in await self._run("pending", _SHARD)]

    async def put_status(self, status: ErasureStatus) -> None:
        await self._run("put_status", status.user_id, _encoder.encode(status))

    async def delete_contacts_and_preferences(self, user_id: str) -> None:
        await asyncio.gather(self._run("delete_contacts", user_id),
                             self._run("delete_preferences", user_id))

    async def delete_inbox(self, user_id: str) -> None:
        await self._run("delete_inbox", user_id)  # one partition tombstone

    async def delete_event(self, author_id: str, created_at: int, event_id: str) -> None:
        await asyncio.gather(
            self._run("delete_author_event", author_id, bucket_of(created_at), created_at,
                      event_id),
            self._run("delete_event", event_id))

    async def index_direct(self, author_id: str, created_at: int, event_id: str,
                           ttl_s: int) -> None:
        await self._run("index_direct", author_id, created_at, event_id, max(1, ttl_s))

    async def direct_events(self, author_id: str, limit: int) -> list[Position]:
        rows = await self._run("direct_events", author_id, limit)
        return [Position(int(t), str(e)) for t, e in rows]  # type: ignore[call-overload]

    async def delete_direct(self, author_id: str, created_at: int, event_id: str) -> None:
        await self._run("delete_event", event_id)
        await self._run("delete_direct", author_id, created_at, event_id)

    async def delete_inbox_row(self, user_id: str, created_at: int, event_id: str) -> None:
        await self._run("delete_inbox_row", user_id, created_at, event_id)

    async def delivery_events(self, user_id: str, limit: int) -> list[str]:
        return [str(r[0]) for r in await self._run("delivery_events", user_id, limit)]

    async def delete_deliveries(self, user_id: str, event_id: str) -> None:
        await self._run("delete_deliveries", event_id, user_id)
        await self._run("delete_delivery_index", user_id, event_id)
