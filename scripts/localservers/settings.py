"""Where the local servers listen and keep their state, read once from the environment.

Two sets: the single-node set (one Redis, one Cassandra node; what ``make test`` and CI use)
and the cluster (three Cassandra nodes on 127.0.0.1-127.0.0.3, a Redis Cluster of six
nodes). Every progress message goes to stderr through ``say``; a failure the user must
act on is a ``ServiceError`` (one clear message, exit status 1).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

SCRIPTS_DIR = Path(__file__).resolve().parent.parent
REPO_ROOT = SCRIPTS_DIR.parent

LOOPBACK = "127.0.0.1"

DEFAULT_REDIS_PORT = 16379
DEFAULT_CQL_PORT = 19042
DEFAULT_STORAGE_PORT = 17000
DEFAULT_JMX_PORT = 17199

# The cluster: the same CQL and storage port on each node's own address; JMX (local only,
# on 127.0.0.1) and the six Redis ports are consecutive from the first.
CLUSTER_CASSANDRA_HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
CLUSTER_REDIS_NODES = 6  # three primaries, one replica each
DEFAULT_CLUSTER_CQL_PORT = 29042
DEFAULT_CLUSTER_STORAGE_PORT = 27000
DEFAULT_CLUSTER_JMX_PORT = 27199
DEFAULT_CLUSTER_REDIS_PORT = 26379
# Redis Cluster's bus port is the client port + 10000 unless set; ours sit right above the
# client ports instead, below the kernel's ephemeral range (32768+), so no outgoing
# connection can hold one.
CLUSTER_BUS_OFFSET = 100
DEFAULT_CLUSTER_HEAP = "768m"
# SimpleSnitch puts every node in this datacenter.
CLUSTER_DATACENTER = "datacenter1"
CLUSTER_REPLICATION = f"NetworkTopologyStrategy:{CLUSTER_DATACENTER}=3"


class ServiceError(Exception):
    """A failure reported to the user as one clear message (exit status 1)."""


def say(message: str) -> None:
    print(f"[services] {message}", file=sys.stderr, flush=True)


def _port_from_env(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        port = int(raw)
    except ValueError:
        raise ServiceError(f"{name}={raw!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise ServiceError(f"{name}={port} is outside 1-65535")
    return port


def _flag_from_env(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _heap_from_env(name: str, default: str) -> str:
    raw = os.environ.get(name, "").strip().lower() or default
    if not (raw[:-1].isdigit() and raw[-1] in "mg"):
        raise ServiceError(f"{name}={raw!r} is not a heap size such as 768m or 1g")
    return raw


def _default_cache_dir() -> Path:
    explicit = os.environ.get("FEEDSVC_CACHE_DIR", "").strip()
    if explicit:
        return Path(explicit).expanduser().absolute()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return (base / "feedsvc").absolute()


@dataclass(frozen=True)
class Settings:
    """The single-node set, and where both sets keep their state and the jar cache."""

    redis_port: int
    cql_port: int
    storage_port: int
    jmx_port: int
    state_dir: Path
    cache_dir: Path
    fast: bool

    @classmethod
    def from_env(cls) -> Settings:
        state = os.environ.get("FEEDSVC_SERVICES_DIR", "").strip()
        settings = cls(
            redis_port=_port_from_env("FEEDSVC_LOCAL_REDIS_PORT", DEFAULT_REDIS_PORT),
            cql_port=_port_from_env("FEEDSVC_LOCAL_CQL_PORT", DEFAULT_CQL_PORT),
            storage_port=_port_from_env("FEEDSVC_LOCAL_STORAGE_PORT", DEFAULT_STORAGE_PORT),
            jmx_port=_port_from_env("FEEDSVC_LOCAL_JMX_PORT", DEFAULT_JMX_PORT),
            state_dir=(Path(state).expanduser() if state else REPO_ROOT / ".services").absolute(),
            cache_dir=_default_cache_dir(),
            fast=_flag_from_env("FEEDSVC_LOCAL_FAST"),
        )
        ports = [settings.redis_port, settings.cql_port, settings.storage_port, settings.jmx_port]
        if len(set(ports)) != len(ports):
            raise ServiceError(f"the four local ports must differ, got {ports}")
        return settings

    def env_lines(self) -> list[str]:
        return [
            f"FEEDSVC_CASSANDRA_HOSTS={LOOPBACK}:{self.cql_port}",
            f"FEEDSVC_REDIS_URL=redis://{LOOPBACK}:{self.redis_port}/0",
        ]


@dataclass(frozen=True)
class ClusterSettings:
    """The three-node Cassandra cluster and the Redis Cluster (``--cluster``)."""

    cql_port: int
    storage_port: int
    jmx_port: int  # node N uses jmx_port + N - 1
    redis_port: int  # Redis node N uses redis_port + N - 1
    heap: str
    state_dir: Path
    cache_dir: Path
    fast: bool

    @classmethod
    def from_env(cls, base: Settings) -> ClusterSettings:
        settings = cls(
            cql_port=_port_from_env("FEEDSVC_CLUSTER_CQL_PORT", DEFAULT_CLUSTER_CQL_PORT),
            storage_port=_port_from_env(
                "FEEDSVC_CLUSTER_STORAGE_PORT", DEFAULT_CLUSTER_STORAGE_PORT),
            jmx_port=_port_from_env("FEEDSVC_CLUSTER_JMX_PORT", DEFAULT_CLUSTER_JMX_PORT),
            redis_port=_port_from_env("FEEDSVC_CLUSTER_REDIS_PORT", DEFAULT_CLUSTER_REDIS_PORT),
            heap=_heap_from_env("FEEDSVC_CLUSTER_HEAP", DEFAULT_CLUSTER_HEAP),
            state_dir=base.state_dir / "cluster",
            cache_dir=base.cache_dir,
            fast=base.fast,
        )
        # Everything that listens on 127.0.0.1 (the first node's address) must differ, from
        # each other and from the single-node set, so that both sets can run side by side.
        ours = [settings.cql_port, settings.storage_port, *settings.jmx_ports(),
                *settings.redis_ports(), *settings.redis_bus_ports()]
        if len(set(ours)) != len(ours):
            raise ServiceError(f"the cluster's ports overlap: {sorted(ours)}")
        single = {base.redis_port, base.cql_port, base.storage_port, base.jmx_port}
        clash = sorted(single.intersection(ours))
        if clash:
            raise ServiceError(f"the cluster's ports {clash} are the single-node set's ports")
        if max(ours) > 65535:
            raise ServiceError(f"the cluster's ports run past 65535: {max(ours)}")
        return settings

    def jmx_ports(self) -> list[int]:
        return [self.jmx_port + i for i in range(len(CLUSTER_CASSANDRA_HOSTS))]

    def redis_ports(self) -> list[int]:
        return [self.redis_port + i for i in range(CLUSTER_REDIS_NODES)]

    def redis_bus_ports(self) -> list[int]:
        return [port + CLUSTER_BUS_OFFSET for port in self.redis_ports()]

    def env_lines(self) -> list[str]:
        hosts = ",".join(f"{host}:{self.cql_port}" for host in CLUSTER_CASSANDRA_HOSTS)
        nodes = ",".join(f"{LOOPBACK}:{port}" for port in self.redis_ports())
        return [
            f"FEEDSVC_CASSANDRA_HOSTS={hosts}",
            # Every node, so a client starts (and re-discovers) from any that answers.
            f"FEEDSVC_REDIS_URL=redis://{nodes}/0",
            "FEEDSVC_REDIS_CLUSTER=true",
            f"FEEDSVC_REPLICATION={CLUSTER_REPLICATION}",
        ]
