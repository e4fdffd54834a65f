"""Templates and the delivery log on Cassandra (``cql/004_delivery.cql``): the
``TemplateStore`` and ``DeliveryLog`` ports of ``feedsvc/delivery/state.py``, on the feed
store's session. Rows hold msgpack bodies; writes are upserts."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
from cassandra.query import PreparedStatement

from feedsvc.delivery.state import DeliveryRecord
from feedsvc.delivery.templates import Template
from feedsvc.store.cassandra import CassandraStore

_STATEMENTS = {
    "put_template": "INSERT INTO {ks}.templates_by_name (name, body) VALUES (?, ?)",
    "template": "SELECT body FROM {ks}.templates_by_name WHERE name = ?",
    "record": "INSERT INTO {ks}.deliveries_by_notification (event_id, user_id, channel, "
              "target, body) VALUES (?, ?, ?, ?, ?) USING TTL ?",
    # Erasure finds a user's notifications by this index (cql/005).
    "index_user": "INSERT INTO {ks}.deliveries_by_user (user_id, event_id) VALUES (?, ?) "
                  "USING TTL ?",
    "records": "SELECT body FROM {ks}.deliveries_by_notification WHERE event_id = ? AND "
               "user_id = ? LIMIT 1000",
}

_encoder = msgspec.msgpack.Encoder()
_template = msgspec.msgpack.Decoder(Template)
_record = msgspec.msgpack.Decoder(DeliveryRecord)


class CassandraDeliveryStore:
    """``TemplateStore`` and ``DeliveryLog`` on Cassandra; see the module docstring."""

    def __init__(self, store: CassandraStore, statements: dict[str, PreparedStatement]) -> None:
        self.store, self._ps = store, statements

    @classmethod
    async def open(cls, store: CassandraStore) -> CassandraDeliveryStore:
        return cls(store, await store.prepare(_STATEMENTS))

    async def put_template(self, name: str, template: Template) -> None:
        await self.store.run(self._ps["put_template"], name, _encoder.encode(template))

    async def template(self, name: str) -> Template | None:
        rows = await self.store.run(self._ps["template"], name)
        return _template.decode(rows[0][0]) if rows else None

    async def record(self, event_id: str, user_id: str, record: DeliveryRecord,
                     ttl_s: int) -> None:
        await self.record_many(event_id, user_id, (record,), ttl_s)

    async def record_many(self, event_id: str, user_id: str,
                          records: Sequence[DeliveryRecord], ttl_s: int) -> None:
        """One unlogged batch: the records (one partition) and the user's index row."""
        if not records:
            return
        ttl = max(1, ttl_s)
        await self.store.run_batch(
            [(self._ps["record"], (event_id, user_id, r.channel, r.target, _encoder.encode(r),
                                   ttl)) for r in records]
            + [(self._ps["index_user"], (user_id, event_id, ttl))])

    async def records(self, event_id: str, user_id: str) -> list[DeliveryRecord]:
        rows = await self.store.run(self._ps["records"], event_id, user_id)
        return [_record.decode(row[0]) for row in rows]
