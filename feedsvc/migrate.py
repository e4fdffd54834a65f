"""``feedsvc migrate``: apply ``cql/NNN_*.cql`` in order to the configured keyspace.

Creates the keyspace (replication from ``FEEDSVC_REPLICATION``), records applied versions
in ``schema_migrations`` and skips them next time. Two processes may run it at once: a
lease row written with a lightweight transaction (``IF NOT EXISTS`` with a TTL) lets one
apply while the other waits, then finds nothing left to do. Every statement in the files
is itself idempotent (``IF NOT EXISTS``), so a run that died half way is simply re-run.
Blocking (driver calls); async callers use ``asyncio.to_thread``.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from cassandra.cluster import Session

log = logging.getLogger(__name__)

CQL_DIR = Path(__file__).resolve().parent.parent / "cql"
_FILE = re.compile(r"^(\d{3})_[A-Za-z0-9_]+\.cql$")
LEASE_TTL_S = 120
LEASE_VERSION = -1


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


def split_statements(text: str) -> tuple[str, ...]:
    """CQL text -> statements (``--`` comments dropped; ``;`` ends a statement)."""
    lines = [line.split("--", 1)[0] for line in text.splitlines()]
    parts = (part.strip() for part in "\n".join(lines).split(";"))
    return tuple(part for part in parts if part)


def load_migrations(directory: Path = CQL_DIR) -> list[Migration]:
    found = []
    for path in sorted(directory.glob("*.cql")):
        match = _FILE.match(path.name)
        if not match:
            raise ValueError(f"migration file name must be NNN_name.cql: {path.name}")
        found.append(Migration(int(match.group(1)), path.stem,
                               split_statements(path.read_text())))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise ValueError("two migration files share a version number")
    return found


def replication_map(spec: str) -> str:
    """``SimpleStrategy:1`` / ``NetworkTopologyStrategy:dc1=3:dc2=2`` -> CQL map literal."""
    strategy, *rest = spec.split(":")
    if strategy == "SimpleStrategy":
        return f"{{'class': 'SimpleStrategy', 'replication_factor': {int(rest[0])}}}"
    pairs = ", ".join(f"'{dc}': {int(rf)}" for dc, rf in (p.split("=") for p in rest))
    return f"{{'class': 'NetworkTopologyStrategy', {pairs}}}"


def migrate(session: Session, keyspace: str, replication: str = "SimpleStrategy:1",
            migrations: list[Migration] | None = None, wait_s: float = 300.0) -> list[int]:
    """Apply pending migrations; returns the versions this call applied."""
    migrations = load_migrations() if migrations is None else migrations
    session.execute(
        f"CREATE KEYSPACE IF NOT EXISTS {keyspace} "
        f"WITH replication = {replication_map(replication)}"
    )
    session.execute(
        f"CREATE TABLE IF NOT EXISTS {keyspace}.schema_migrations ("
        "version int PRIMARY KEY, name text, owner text, applied_at timestamp)"
    )
    owner = str(uuid.uuid4())
    deadline = time.monotonic() + wait_s
    while True:
        row = session.execute(
            f"INSERT INTO {keyspace}.schema_migrations (version, name, owner) "
            f"VALUES (%s, 'lease', %s) IF NOT EXISTS USING TTL {LEASE_TTL_S}",
            (LEASE_VERSION, owner),
        ).one()
        if row.applied:
            break
        if time.monotonic() > deadline:
            raise TimeoutError("another migrate holds the lease; gave up waiting")
        time.sleep(0.5)
    try:
        applied_rows = session.execute(f"SELECT version FROM {keyspace}.schema_migrations")
        done = {r.version for r in applied_rows if r.version != LEASE_VERSION}
        applied = []
        for migration in migrations:
            if migration.version in done:
                continue
            log.info("applying %s", migration.name)
            session.set_keyspace(keyspace)
            for statement in migration.statements:
                session.execute(statement, timeout=120)
            session.execute(
                f"INSERT INTO {keyspace}.schema_migrations (version, name, applied_at) "
                "VALUES (%s, %s, toTimestamp(now()))", (migration.version, migration.name),
            )
            applied.append(migration.version)
        return applied
    finally:
        session.execute(
            f"DELETE FROM {keyspace}.schema_migrations WHERE version = %s IF owner = %s",
            (LEASE_VERSION, owner),
        )
