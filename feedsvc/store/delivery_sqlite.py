"""Templates and the delivery log in the embedded SQLite file: the ``TemplateStore`` and
``DeliveryLog`` ports of ``feedsvc/delivery/state.py``, on the embedded store's connection
and thread. Rows hold msgpack bodies, as on Cassandra; expired log rows are filtered on
read and purged with the store's."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from feedsvc.clock import now_ms
from feedsvc.delivery.state import DeliveryRecord
from feedsvc.delivery.templates import Template
from feedsvc.store.sqlite import SqliteStore

_SCHEMA = """
CREATE TABLE IF NOT EXISTS templates_by_name (name TEXT PRIMARY KEY, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS deliveries_by_recipient (
    event_id TEXT NOT NULL, user_id TEXT NOT NULL, channel TEXT NOT NULL,
    target TEXT NOT NULL, body BLOB NOT NULL, expires_at INTEGER NOT NULL,
    PRIMARY KEY (event_id, user_id, channel, target));
"""

_encoder = msgspec.msgpack.Encoder()
_template = msgspec.msgpack.Decoder(Template)
_record = msgspec.msgpack.Decoder(DeliveryRecord)


class SqliteDeliveryStore:
    """``TemplateStore`` and ``DeliveryLog`` on the embedded file; see the module docstring."""

    def __init__(self, store: SqliteStore) -> None:
        self.store = store

    @classmethod
    async def open(cls, store: SqliteStore) -> SqliteDeliveryStore:
        await store._run(store.db.executescript, _SCHEMA)
        return cls(store)

    async def put_template(self, name: str, template: Template) -> None:
        await self.store._run(self.store.db.execute,
                              "INSERT OR REPLACE INTO templates_by_name VALUES (?, ?)",
                              (name, _encoder.encode(template)))

    async def template(self, name: str) -> Template | None:
        row = await self.store._run(lambda: self.store.db.execute(
            "SELECT body FROM templates_by_name WHERE name = ?", (name,)).fetchone())
        return _template.decode(row[0]) if row else None

    async def record(self, event_id: str, user_id: str, record: DeliveryRecord,
                     ttl_s: int) -> None:
        await self.record_many(event_id, user_id, (record,), ttl_s)

    async def record_many(self, event_id: str, user_id: str,
                          records: Sequence[DeliveryRecord], ttl_s: int) -> None:
        expires = now_ms() + max(1, ttl_s) * 1000
        await self.store.write_many(
            "INSERT OR REPLACE INTO deliveries_by_recipient VALUES (?, ?, ?, ?, ?, ?)",
            [(event_id, user_id, r.channel, r.target, _encoder.encode(r), expires)
             for r in records])

    async def records(self, event_id: str, user_id: str) -> list[DeliveryRecord]:
        rows = await self.store._run(lambda: self.store.db.execute(
            "SELECT body FROM deliveries_by_recipient WHERE event_id = ? AND user_id = ? AND "
            "expires_at > ? ORDER BY channel, target", (event_id, user_id, now_ms())).fetchall())
        return [_record.decode(row[0]) for row in rows]
