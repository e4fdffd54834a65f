"""Delivery recipients on Cassandra (``cql/003_recipients.cql``): the ``Recipients`` port of
``feedsvc/delivery/recipients.py``, on the feed store's session. Each row holds a msgpack
body; writes are upserts. A device limit and a deactivation read before they write, so two
racing registrations can pass the limit by one (there is no transaction across rows)."""

from __future__ import annotations

import msgspec
from cassandra.query import PreparedStatement

from feedsvc.delivery.recipients import (
    MAX_DEVICES,
    Contacts,
    Device,
    Preferences,
    same_target,
)
from feedsvc.store.cassandra import CassandraStore

_STATEMENTS = {
    "put_device": "INSERT INTO {ks}.devices_by_user (user_id, device_id, body) VALUES (?, ?, ?)",
    "delete_device": "DELETE FROM {ks}.devices_by_user WHERE user_id = ? AND device_id = ?",
    "devices": "SELECT body FROM {ks}.devices_by_user WHERE user_id = ? LIMIT 1000",
    "device": "SELECT body FROM {ks}.devices_by_user WHERE user_id = ? AND device_id = ?",
    "put_contacts": "INSERT INTO {ks}.contacts_by_user (user_id, body) VALUES (?, ?)",
    "contacts": "SELECT body FROM {ks}.contacts_by_user WHERE user_id = ?",
    "put_preferences": "INSERT INTO {ks}.preferences_by_user (user_id, body) VALUES (?, ?)",
    "preferences": "SELECT body FROM {ks}.preferences_by_user WHERE user_id = ?",
}

_encoder = msgspec.msgpack.Encoder()
_device = msgspec.msgpack.Decoder(Device)
_contacts = msgspec.msgpack.Decoder(Contacts)
_preferences = msgspec.msgpack.Decoder(Preferences)


class CassandraRecipients:
    """``Recipients`` on Cassandra; see the module docstring."""

    def __init__(self, store: CassandraStore, statements: dict[str, PreparedStatement]) -> None:
        self.store, self._ps = store, statements

    @classmethod
    async def open(cls, store: CassandraStore) -> CassandraRecipients:
        return cls(store, await store.prepare(_STATEMENTS))

    async def put_device(self, user_id: str, device: Device) -> bool:
        known = await self.devices(user_id)
        if (device.device_id not in {d.device_id for d in known}
                and len(known) >= MAX_DEVICES):
            return False
        await self.store.run(self._ps["put_device"], user_id, device.device_id,
                             _encoder.encode(device))
        return True

    async def delete_device(self, user_id: str, device_id: str) -> None:
        await self.store.run(self._ps["delete_device"], user_id, device_id)

    async def devices(self, user_id: str) -> list[Device]:
        rows = await self.store.run(self._ps["devices"], user_id)
        return [_device.decode(row[0]) for row in rows]

    async def deactivate_device(self, user_id: str, device: Device, reason: str) -> None:
        rows = await self.store.run(self._ps["device"], user_id, device.device_id)
        if not rows:
            return
        stored = _device.decode(rows[0][0])
        if stored.active and same_target(stored, device):
            dead = msgspec.structs.replace(stored, active=False, deactivated_reason=reason)
            await self.store.run(self._ps["put_device"], user_id, device.device_id,
                                 _encoder.encode(dead))

    async def put_contacts(self, user_id: str, contacts: Contacts) -> None:
        await self.store.run(self._ps["put_contacts"], user_id, _encoder.encode(contacts))

    async def contacts(self, user_id: str) -> Contacts | None:
        rows = await self.store.run(self._ps["contacts"], user_id)
        return _contacts.decode(rows[0][0]) if rows else None

    async def put_preferences(self, user_id: str, prefs: Preferences) -> None:
        await self.store.run(self._ps["put_preferences"], user_id, _encoder.encode(prefs))

    async def preferences(self, user_id: str) -> Preferences | None:
        rows = await self.store.run(self._ps["preferences"], user_id)
        return _preferences.decode(rows[0][0]) if rows else None
