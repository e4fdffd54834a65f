"""Fixtures: real Cassandra and Redis (see ``tests/servers.py``), and factories that build
runtimes and HTTP clients for both backends and close what they build."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer
from cassandra.cluster import Cluster, Session

from feedsvc.api.app import init_app
from feedsvc.api.server import GuardedAppRunner, Limits
from feedsvc.config import Settings
from feedsvc.migrate import migrate
from feedsvc.queue.embedded import EmbeddedQueue
from feedsvc.queue.redis import RedisQueue, cluster_client
from feedsvc.runtime import Runtime, open_delivery, open_policy
from feedsvc.store.cassandra import CassandraStore, connect_cluster
from feedsvc.store.recipients_cassandra import CassandraRecipients
from feedsvc.store.recipients_sqlite import SqliteRecipients
from feedsvc.store.sqlite import SqliteStore
from tests.servers import Endpoints, discover

if TYPE_CHECKING:
    from tests.apiclient import Api

SERVICE_KEY = "test-service-key"
JWT_SECRET = "test-jwt-secret-0123456789abcdef-0123456789"
BACKENDS = ["embedded", "cassandra"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Cases marked ``cluster`` kill nodes of the local cluster: they run under
    ``make test-cluster`` (FEEDSVC_REDIS_CLUSTER=true) and are deselected elsewhere."""
    if Settings.load({"FEEDSVC_REDIS_CLUSTER": os.environ.get("FEEDSVC_REDIS_CLUSTER", "")}
                     ).redis_cluster:
        return
    chosen = [item for item in items if item.get_closest_marker("cluster") is None]
    if len(chosen) < len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in chosen])
        items[:] = chosen


@pytest.fixture(scope="session")
def endpoints() -> Iterator[Endpoints]:
    with ExitStack() as stack:
        try:
            found = discover(stack)
        except Exception as exc:  # never a skip: the suite needs real servers
            pytest.fail(f"no Cassandra/Redis for the tests ({exc}); run `make services`",
                        pytrace=False)
        yield found


class CassandraKeyspace:
    def __init__(self, cluster: Cluster, session: Session, keyspace: str,
                 hosts: tuple[str, ...]) -> None:
        self.cluster, self.session, self.keyspace, self.hosts = cluster, session, keyspace, hosts


@pytest.fixture(scope="session")
async def cassandra(endpoints: Endpoints) -> AsyncIterator[CassandraKeyspace]:
    """A session on a fresh keyspace (replication: ``FEEDSVC_REPLICATION`` when set), migrated,
    dropped at the end."""
    cluster, session = await asyncio.to_thread(connect_cluster, endpoints.cassandra_hosts)
    keyspace = f"feedsvc_test_{uuid.uuid4().hex[:12]}"
    await asyncio.to_thread(migrate, session, keyspace, endpoints.replication)
    try:
        yield CassandraKeyspace(cluster, session, keyspace, endpoints.cassandra_hosts)
    finally:
        await asyncio.to_thread(session.execute, f"DROP KEYSPACE IF EXISTS {keyspace}",
                                timeout=120)
        await asyncio.to_thread(cluster.shutdown)


@pytest.fixture(scope="session")
async def cassandra_store(cassandra: CassandraKeyspace) -> CassandraStore:
    store = CassandraStore(cassandra.cluster, cassandra.session, cassandra.keyspace)
    await asyncio.to_thread(store._prepare_all)
    return store


@pytest.fixture(scope="session")
async def cassandra_recipients(cassandra_store: CassandraStore) -> CassandraRecipients:
    return await CassandraRecipients.open(cassandra_store)


@pytest.fixture
def prefix() -> str:
    """A per-test namespace for ids and Redis keys."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def redis_client(endpoints: Endpoints, prefix: str) -> AsyncIterator[aioredis.Redis]:
    """A Redis client; every key under this test's prefix is deleted afterwards."""
    client: Any = (cluster_client(endpoints.redis_url) if endpoints.redis_cluster
                   else aioredis.Redis.from_url(endpoints.redis_url))
    try:
        yield client
    finally:
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


def base_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "service_keys": (SERVICE_KEY,), "jwt_secret": JWT_SECRET, "celebrity_threshold": 10,
        "claim_idle": 2.0, "inbox_trim_every": 1, "pull_set_ttl": 0.0,
    }
    values.update(overrides)
    return Settings(**values)


MakeRuntime = Callable[..., Awaitable[Runtime]]


@pytest.fixture(params=BACKENDS)
async def make_runtime(
    request: pytest.FixtureRequest, tmp_path: Path, prefix: str, endpoints: Endpoints,
    cassandra: CassandraKeyspace, cassandra_store: CassandraStore,
    cassandra_recipients: CassandraRecipients,
) -> AsyncIterator[MakeRuntime]:
    """Factory: ``await make_runtime(celebrity_threshold=5)`` -> a Runtime on this test's
    backend (parametrized: embedded, cassandra). Everything it opens is closed after.
    ``clock=`` (a ``tests.clock.FakeClock``) is the runtime's clock instead of the wall's."""
    backend: str = request.param
    opened: list[Callable[[], Awaitable[None]]] = []

    async def factory(**overrides: Any) -> Runtime:
        clock: dict[str, Any] = {"clock": overrides.pop("clock")} if "clock" in overrides \
            else {}
        if backend == "embedded":
            settings = base_settings(data_dir=tmp_path / "data", **overrides)
            store: Any = await SqliteStore.open(settings.data_dir / "feedsvc.sqlite3")
            queue: Any = await EmbeddedQueue.open(
                settings.data_dir / "queue.sqlite3", claim_idle=settings.claim_idle,
                low_max_age=settings.low_max_age)
            opened.append(store.close)
            recipients = await SqliteRecipients.open(store)
        else:
            settings = base_settings(
                cassandra_hosts=endpoints.cassandra_hosts, redis_url=endpoints.redis_url,
                redis_cluster=endpoints.redis_cluster, keyspace=cassandra.keyspace,
                queue_prefix=prefix, **overrides)
            store = cassandra_store
            queue = await RedisQueue.open(
                endpoints.redis_url, prefix=settings.queue_prefix, claim_idle=settings.claim_idle,
                low_max_age=settings.low_max_age, shards=settings.queue_shards,
                cluster=settings.redis_cluster)
            opened.append(queue.close)
            opened.append(lambda: _drop_prefix(queue, prefix))  # runs before close
            return Runtime(settings, store, queue,
                           recipients=cassandra_recipients,
                           delivery=await open_delivery(store, queue),
                           policy=await open_policy(store), **clock)
        opened.append(queue.close)
        return Runtime(settings, store, queue, recipients=recipients,
                       delivery=await open_delivery(store, queue),
                       policy=await open_policy(store), **clock)

    yield factory
    for close in reversed(opened):
        await close()


async def _drop_prefix(queue: RedisQueue, prefix: str) -> None:
    keys = [k async for k in queue.redis.scan_iter(match=f"{prefix}:*", count=1000)]
    if keys:
        await queue.redis.delete(*keys)


@pytest.fixture
async def runtime(make_runtime: MakeRuntime) -> Runtime:
    return await make_runtime()


MakeClient = Callable[[Runtime], Awaitable[TestClient[Any, Any]]]


class GuardedTestServer(TestServer):
    """The test server on the production runner (timeouts, connection cap, JSON errors)."""

    def __init__(self, app: Any, limits: Limits, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.limits = limits

    async def _make_runner(self, **kwargs: Any) -> GuardedAppRunner:
        return GuardedAppRunner(self.app, self.limits, **kwargs)


@pytest.fixture
async def make_client() -> AsyncIterator[MakeClient]:
    clients: list[TestClient[Any, Any]] = []

    async def factory(rt: Runtime) -> TestClient[Any, Any]:
        server = GuardedTestServer(init_app(rt), Limits.of(rt.settings))
        client: TestClient[Any, Any] = TestClient(server)
        await client.start_server()
        clients.append(client)
        return client

    yield factory
    for client in clients:
        await client.close()


@pytest.fixture
def service_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {SERVICE_KEY}"}


MakeApi = Callable[..., Awaitable["Api"]]


@pytest.fixture
async def make_api(make_runtime: MakeRuntime, make_client: MakeClient, prefix: str) -> MakeApi:
    """Factory: ``await make_api(celebrity_threshold=5)`` -> an API client on this test's
    backend (workers are not running: tests call ``api.drain()``)."""
    from tests.apiclient import Api

    async def factory(**overrides: Any) -> Api:
        rt = await make_runtime(**overrides)
        return Api(await make_client(rt), rt, prefix)

    return factory
