"""Which servers make up each set, in the order they start.

- single (default): ``redis`` and ``cassandra`` on 127.0.0.1, what ``make test`` uses;
- cluster (``--cluster``): ``redis-1`` .. ``redis-6`` (a Redis Cluster; ``redis-cli`` makes
  the first three primaries and gives each one replica) and ``cassandra-1`` .. ``cassandra-3``
  on 127.0.0.1 .. 127.0.0.3, ``cassandra-1`` the seed, tokens spread evenly over the ring.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .cassandra_node import CassandraNode, CassandraServer
from .redis_node import RedisServer
from .server import Server
from .settings import (
    CLUSTER_CASSANDRA_HOSTS,
    LOOPBACK,
    ClusterSettings,
    ServiceError,
    Settings,
)

KINDS = ("redis", "cassandra")
# Murmur3Partitioner's ring runs from -2**63 to 2**63 - 1.
RING_START = -(2**63)
RING_SIZE = 2**64


def evenly_spaced_tokens(count: int) -> list[int]:
    return [RING_START + i * (RING_SIZE // count) for i in range(count)]


@dataclass(frozen=True)
class Topology:
    """The servers of one set, in start order (Redis first, then Cassandra node by node)."""

    servers: tuple[Server, ...]
    clustered: bool

    def redis_nodes(self) -> list[RedisServer]:
        return [s for s in self.servers if isinstance(s, RedisServer)]

    def cassandra_nodes(self) -> list[CassandraServer]:
        return [s for s in self.servers if isinstance(s, CassandraServer)]

    def names(self) -> list[str]:
        return [server.name for server in self.servers]

    def select(self, names: Sequence[str]) -> list[Server]:
        """Servers by name; ``redis`` / ``cassandra`` name every server of that kind, and
        ``redis-primary`` the first Redis Cluster node that is a primary right now."""
        wanted = list(dict.fromkeys(names))
        if not wanted:
            return list(self.servers)
        chosen: list[Server] = []
        for name in wanted:
            if name in KINDS:
                chosen += [s for s in self.servers if s.kind == name]
            elif name == "redis-primary" and self.clustered:
                primaries = [node for node in self.redis_nodes() if node.role() == "primary"]
                if not primaries:
                    raise ServiceError("no redis cluster node answers as a primary")
                chosen.append(primaries[0])
            else:
                found = [s for s in self.servers if s.name == name]
                if not found:
                    extra = ", redis-primary" if self.clustered else ""
                    raise ServiceError(
                        f"unknown server {name!r}; choose from "
                        f"{', '.join([*KINDS, *self.names()] if self.clustered else KINDS)}"
                        f"{extra}")
                chosen += found
        unique = list(dict.fromkeys(chosen))
        return [s for s in self.servers if s in unique]  # always in start order


def single(settings: Settings) -> Topology:
    state = settings.state_dir
    cassandra = CassandraNode(
        name="cassandra",
        directory=state / "cassandra",
        host=LOOPBACK,
        cql_port=settings.cql_port,
        storage_port=settings.storage_port,
        jmx_port=settings.jmx_port,
        seeds=f"{LOOPBACK}:{settings.storage_port}",
        cluster_name="feedsvc-local",
        initial_token=0,
        heap="1g",
        cache_dir=settings.cache_dir,
        fast=settings.fast,
    )
    return Topology(
        (RedisServer("redis", state / "redis", LOOPBACK, settings.redis_port),
         CassandraServer(cassandra)),
        clustered=False,
    )


def cluster(settings: ClusterSettings) -> Topology:
    state, width = settings.state_dir, 14
    redis = [
        RedisServer(f"redis-{i}", state / f"redis-{i}", LOOPBACK, port, bus, width)
        for i, (port, bus) in enumerate(
            zip(settings.redis_ports(), settings.redis_bus_ports(), strict=True), start=1)
    ]
    seed = f"{CLUSTER_CASSANDRA_HOSTS[0]}:{settings.storage_port}"
    tokens = evenly_spaced_tokens(len(CLUSTER_CASSANDRA_HOSTS))
    cassandra = [
        CassandraServer(CassandraNode(
            name=f"cassandra-{i}",
            directory=state / f"cassandra-{i}",
            host=host,
            cql_port=settings.cql_port,
            storage_port=settings.storage_port,
            jmx_port=jmx,
            seeds=seed,
            cluster_name="feedsvc-local-cluster",
            initial_token=token,
            heap=settings.heap,
            cache_dir=settings.cache_dir,
            fast=settings.fast,
            join_without_bootstrap=True,
            label_width=width,
        ))
        for i, (host, jmx, token) in enumerate(
            zip(CLUSTER_CASSANDRA_HOSTS, settings.jmx_ports(), tokens, strict=True), start=1)
    ]
    return Topology((*redis, *cassandra), clustered=True)
