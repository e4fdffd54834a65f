"""The ground the rest stands on: the real Cassandra node and Redis server answer through
their drivers, migrations are idempotent and safe to run concurrently, and the compose
file names only commands the CLI has."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
import yaml

from feedsvc.cli import build_parser
from feedsvc.migrate import load_migrations, migrate, replication_map, split_statements
from feedsvc.store.cassandra import connect_cluster
from tests.conftest import CassandraKeyspace
from tests.servers import ROOT, Endpoints


async def test_cassandra_row_round_trip(cassandra: CassandraKeyspace) -> None:
    session, ks = cassandra.session, cassandra.keyspace
    await asyncio.to_thread(
        session.execute,
        f"CREATE TABLE IF NOT EXISTS {ks}.probe_by_id (id text PRIMARY KEY, value int)",
    )
    key = uuid.uuid4().hex
    await asyncio.to_thread(
        session.execute, f"INSERT INTO {ks}.probe_by_id (id, value) VALUES (%s, %s)", (key, 41)
    )
    row = (await asyncio.to_thread(
        session.execute, f"SELECT value FROM {ks}.probe_by_id WHERE id = %s", (key,)
    )).one()
    assert row.value == 41
    version = (await asyncio.to_thread(
        session.execute, "SELECT release_version FROM system.local"
    )).one()
    assert version.release_version.startswith("5.0")


async def test_redis_stream_group_round_trip(redis_client: aioredis.Redis, prefix: str) -> None:
    stream = f"{prefix}:probe"
    await redis_client.xgroup_create(stream, "g", id="0", mkstream=True)
    entry = await redis_client.xadd(stream, {"k": "v"})
    reply: Any = await redis_client.xreadgroup("g", "c1", {stream: ">"}, count=10)
    assert reply[0][1][0][0] == entry
    assert (await redis_client.xpending(stream, "g"))["pending"] == 1
    assert await redis_client.xack(stream, "g", entry) == 1
    assert (await redis_client.xpending(stream, "g"))["pending"] == 0


def test_split_statements_drops_comments() -> None:
    text = "-- a comment; with a semicolon\nCREATE TABLE a (x int PRIMARY KEY);\n\nSELECT 1 ;"
    assert split_statements(text) == ("CREATE TABLE a (x int PRIMARY KEY)", "SELECT 1")


def test_replication_map() -> None:
    assert replication_map("SimpleStrategy:1") == \
        "{'class': 'SimpleStrategy', 'replication_factor': 1}"
    assert replication_map("NetworkTopologyStrategy:dc1=3:dc2=2") == \
        "{'class': 'NetworkTopologyStrategy', 'dc1': 3, 'dc2': 2}"


async def test_migrate_is_idempotent_and_safe_concurrently(endpoints: Endpoints) -> None:
    keyspace = f"feedsvc_mig_{uuid.uuid4().hex[:10]}"
    clusters = [await asyncio.to_thread(connect_cluster, endpoints.cassandra_hosts)
                for _ in range(2)]
    try:
        first, second = await asyncio.gather(*(
            asyncio.to_thread(migrate, session, keyspace) for _, session in clusters
        ))
        versions = [m.version for m in load_migrations()]
        # One run applied everything, the other found nothing left to do.
        assert sorted(first + second) == versions
        again = await asyncio.to_thread(migrate, clusters[0][1], keyspace)
        assert again == []
        rows = await asyncio.to_thread(
            clusters[0][1].execute, f"SELECT version FROM {keyspace}.schema_migrations")
        assert sorted(r.version for r in rows) == versions
        tables = await asyncio.to_thread(
            clusters[0][1].execute,
            "SELECT table_name FROM system_schema.tables WHERE keyspace_name = %s", (keyspace,))
        assert {"inbox_by_user", "events_by_author", "followers_by_author"} <= {
            t.table_name for t in tables}
    finally:
        await asyncio.to_thread(clusters[0][1].execute, f"DROP KEYSPACE IF EXISTS {keyspace}",
                                timeout=120)
        for cluster, _ in clusters:
            await asyncio.to_thread(cluster.shutdown)


def _cli_commands() -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return set(sub.choices)  # type: ignore[arg-type]


def test_compose_names_only_existing_cli_commands() -> None:
    compose = yaml.safe_load(Path(ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"cassandra", "redis", "migrate", "api", "worker"} <= set(services)
    commands = _cli_commands()
    named = []
    for service in services.values():
        command = service.get("command")
        if command is None:
            continue
        words = command.split() if isinstance(command, str) else list(command)
        if words and words[0] == "feedsvc":
            named.append(words[1])
    assert {"migrate", "api", "worker"} <= set(named)
    assert set(named) <= commands
