"""Where the test suite's real Cassandra and Redis come from, in order:

1. ``FEEDSVC_CASSANDRA_HOSTS`` / ``FEEDSVC_REDIS_URL`` when set (``make test`` sets them;
   ``make test-cluster`` points them at the local cluster);
2. testcontainers, when a Docker engine answers (the docker CLI alone is not enough);
3. otherwise the project's own local servers (``scripts/services.py start``).

The test keyspace's replication is ``FEEDSVC_REPLICATION`` when set (the cluster's is
``NetworkTopologyStrategy:datacenter1=3``), else one replica. With ``CI=true`` a server that
cannot be had is an error, never a skip.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import subprocess
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from feedsvc.config import Settings

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Endpoints:
    cassandra_hosts: tuple[str, ...]
    redis_url: str
    source: str
    replication: str = Settings.replication  # of the test keyspace
    redis_cluster: bool = False  # FEEDSVC_REDIS_URL names nodes of a Redis Cluster


def docker_engine_answers() -> bool:
    """``docker.from_env().ping()``, in a child process: the docker client leaks a socket
    when no engine answers, which this suite's warnings-as-errors would report."""
    probe = "import docker, sys; sys.exit(0 if docker.from_env(timeout=3).ping() else 1)"
    try:
        result = subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=15)
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0


def from_env() -> Endpoints | None:
    hosts = os.environ.get("FEEDSVC_CASSANDRA_HOSTS", "").strip()
    url = os.environ.get("FEEDSVC_REDIS_URL", "").strip()
    if hosts and url:
        return Endpoints(tuple(h.strip() for h in hosts.split(",") if h.strip()), url, "env")
    return None


def from_testcontainers(stack: ExitStack) -> Endpoints:
    from testcontainers.community.cassandra import CassandraContainer
    from testcontainers.community.redis import RedisContainer

    cassandra = stack.enter_context(CassandraContainer("cassandra:5.0"))
    redis = stack.enter_context(RedisContainer("redis:7"))
    host, port = cassandra.get_contact_points()[0]
    redis_host = redis.get_container_host_ip()
    redis_port = redis.get_exposed_port(6379)
    return Endpoints((f"{host}:{port}",), f"redis://{redis_host}:{redis_port}/0",
                     "testcontainers")


def from_local_servers() -> Endpoints:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "services.py"), "start"],
        check=True, capture_output=True, text=True, timeout=1200,
    )
    values = _assignments(result.stdout)
    return Endpoints(
        tuple(values["FEEDSVC_CASSANDRA_HOSTS"].split(",")), values["FEEDSVC_REDIS_URL"],
        "local",
    )


def discover(stack: ExitStack) -> Endpoints:
    found = from_env()
    if found is None:
        found = from_testcontainers(stack) if docker_engine_answers() else from_local_servers()
    # Parsed as the service parses it: a bad value fails with the variable's name.
    only = {name: os.environ.get(name, "")
            for name in ("FEEDSVC_REPLICATION", "FEEDSVC_REDIS_CLUSTER")}
    settings = Settings.load(only)
    return dataclasses.replace(found, replication=settings.replication,
                               redis_cluster=settings.redis_cluster)


def _assignments(text: str) -> dict[str, str]:
    """``KEY=VALUE`` lines, as ``scripts/services.py start`` and ``env`` print them."""
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


@functools.cache
def _local_cassandra_hosts(*flags: str) -> tuple[str, ...]:
    """Where ``scripts/services.py`` runs its Cassandra node(s) (asked once per test run):
    no flags for the single node, ``--cluster`` for the cluster."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "services.py"), "env", *flags],
        check=True, capture_output=True, text=True, timeout=60)
    return tuple(_assignments(result.stdout).get("FEEDSVC_CASSANDRA_HOSTS", "").split(","))


def _local_flags(endpoints: Endpoints, needs: str) -> tuple[str, ...]:
    if endpoints.cassandra_hosts == _local_cassandra_hosts():
        return ()
    if endpoints.cassandra_hosts == _local_cassandra_hosts("--cluster"):
        return ("--cluster",)
    pytest.fail(f"this test needs {needs}, which reaches only the local servers "
                f"scripts/services.py runs, not {','.join(endpoints.cassandra_hosts)}; "
                "run it with `make test` or `make test-cluster`", pytrace=False)


def local_services(endpoints: Endpoints, command: str, *servers: str) -> None:
    """``scripts/services.py COMMAND SERVERS`` (pause, resume, kill, restart) on the suite's
    local servers; like nodetool, only for the servers scripts/services.py runs."""
    flags = _local_flags(endpoints, f"`services.py {command}`")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "services.py"), command, *flags,
                    *servers], check=True, capture_output=True, text=True, timeout=300)


def local_nodetool(endpoints: Endpoints, *args: str) -> None:
    """Run nodetool against the suite's Cassandra (``scripts/services.py nodetool``), on
    every node when it is the local cluster. Only the nodes scripts/services.py runs are
    reachable that way (their JMX ports); tests that need nodetool fail, not skip, against
    any other Cassandra."""
    where = _local_flags(endpoints, "nodetool")
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "services.py"), "nodetool", *where, *args],
        capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"nodetool {' '.join(args)} failed ({result.returncode}): "
                           f"{result.stderr.strip()[-2000:]}")
