"""Delivery recipients in the embedded SQLite file: the ``Recipients`` port of
``feedsvc/delivery/recipients.py``, on the embedded store's connection and thread (one file,
one writer). Rows hold msgpack bodies, as on Cassandra."""

from __future__ import annotations

import msgspec

from feedsvc.delivery.recipients import (
    MAX_DEVICES,
    Contacts,
    Device,
    Preferences,
    same_target,
)
from feedsvc.store.sqlite import SqliteStore

_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices_by_user (
    user_id TEXT NOT NULL, device_id TEXT NOT NULL, body BLOB NOT NULL,
    PRIMARY KEY (user_id, device_id));
CREATE TABLE IF NOT EXISTS contacts_by_user (user_id TEXT PRIMARY KEY, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS preferences_by_user (user_id TEXT PRIMARY KEY, body BLOB NOT NULL);
"""

_encoder = msgspec.msgpack.Encoder()
_device = msgspec.msgpack.Decoder(Device)
_contacts = msgspec.msgpack.Decoder(Contacts)
_preferences = msgspec.msgpack.Decoder(Preferences)


class SqliteRecipients:
    """``Recipients`` on the embedded store's file; see the module docstring."""

    def __init__(self, store: SqliteStore) -> None:
        self.store = store

    @classmethod
    async def open(cls, store: SqliteStore) -> SqliteRecipients:
        await store._run(store.db.executescript, _SCHEMA)
        return cls(store)

    async def put_device(self, user_id: str, device: Device) -> bool:
        def put() -> bool:
            db = self.store.db
            with self.store.transaction():
                others = db.execute(
                    "SELECT count(*) FROM devices_by_user WHERE user_id = ? AND device_id != ?",
                    (user_id, device.device_id)).fetchone()[0]
                if others >= MAX_DEVICES:
                    return False
                db.execute("INSERT OR REPLACE INTO devices_by_user VALUES (?, ?, ?)",
                           (user_id, device.device_id, _encoder.encode(device)))
                return True

        return await self.store._run(put)

    async def delete_device(self, user_id: str, device_id: str) -> None:
        await self.store._run(self.store.db.execute,
                              "DELETE FROM devices_by_user WHERE user_id = ? AND device_id = ?",
                              (user_id, device_id))

    async def devices(self, user_id: str) -> list[Device]:
        rows = await self.store._run(lambda: self.store.db.execute(
            "SELECT body FROM devices_by_user WHERE user_id = ? ORDER BY device_id",
            (user_id,)).fetchall())
        return [_device.decode(row[0]) for row in rows]

    async def deactivate_device(self, user_id: str, device: Device, reason: str) -> None:
        def deactivate() -> None:
            db = self.store.db
            with self.store.transaction():
                row = db.execute("SELECT body FROM devices_by_user WHERE user_id = ? AND "
                                 "device_id = ?", (user_id, device.device_id)).fetchone()
                if row is None:
                    return
                stored = _device.decode(row[0])
                if stored.active and same_target(stored, device):
                    dead = msgspec.structs.replace(stored, active=False,
                                                   deactivated_reason=reason)
                    db.execute("UPDATE devices_by_user SET body = ? WHERE user_id = ? AND "
                               "device_id = ?", (_encoder.encode(dead), user_id,
                                                 device.device_id))

        await self.store._run(deactivate)

    async def put_contacts(self, user_id: str, contacts: Contacts) -> None:
        await self.store._run(self.store.db.execute,
                              "INSERT OR REPLACE INTO contacts_by_user VALUES (?, ?)",
                              (user_id, _encoder.encode(contacts)))

    async def contacts(self, user_id: str) -> Contacts | None:
        row = await self.store._run(lambda: self.store.db.execute(
            "SELECT body FROM contacts_by_user WHERE user_id = ?", (user_id,)).fetchone())
        return _contacts.decode(row[0]) if row else None

    async def put_preferences(self, user_id: str, prefs: Preferences) -> None:
        await self.store._run(self.store.db.execute,
                              "INSERT OR REPLACE INTO preferences_by_user VALUES (?, ?)",
                              (user_id, _encoder.encode(prefs)))

    async def preferences(self, user_id: str) -> Preferences | None:
        row = await self.store._run(lambda: self.store.db.execute(
            "SELECT body FROM preferences_by_user WHERE user_id = ?", (user_id,)).fetchone())
        return _preferences.decode(row[0]) if row else None
