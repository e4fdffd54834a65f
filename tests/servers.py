"""Where the test suite's real Cassandra and Redis come from, in order:

1. ``FEEDSVC_CASSANDRA_HOSTS`` / ``FEEDSVC_REDIS_URL`` when set (``make test`` sets them);
2. testcontainers, when a Docker engine answers (the docker CLI alone is not enough);
3. otherwise the project's own local servers (``scripts/services.py start``).

With ``CI=true`` a server that cannot be had is an error, never a skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Endpoints:
    cassandra_hosts: tuple[str, ...]
    redis_url: str
    source: str


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
    if found is not None:
        return found
    if docker_engine_answers():
        return from_testcontainers(stack)
    return from_local_servers()


def _assignments(text: str) -> dict[str, str]:
    """``KEY=VALUE`` lines, as ``scripts/services.py start`` and ``env`` print them."""
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def local_nodetool(endpoints: Endpoints, *args: str) -> None:
    """Run nodetool against the suite's Cassandra when it is the project's local node
    (``scripts/services.py nodetool``). Raises ``LookupError`` when it is another node (from
    the environment or testcontainers), where the local JMX port does not reach it."""
    services = [sys.executable, str(ROOT / "scripts" / "services.py")]
    env = subprocess.run([*services, "env"], check=True, capture_output=True, text=True,
                         timeout=60)
    local = _assignments(env.stdout).get("FEEDSVC_CASSANDRA_HOSTS", "")
    if tuple(local.split(",")) != endpoints.cassandra_hosts:
        raise LookupError(f"the tests' Cassandra ({','.join(endpoints.cassandra_hosts)}) is "
                          "not the local node scripts/services.py runs")
    result = subprocess.run([*services, "nodetool", *args], capture_output=True, text=True,
                            timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"nodetool {' '.join(args)} failed ({result.returncode}): "
                           f"{result.stderr.strip()[-2000:]}")
