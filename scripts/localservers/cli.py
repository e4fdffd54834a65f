"""The commands of ``scripts/services.py``: start, stop, status, env, browser; the faults the chaos
tests inject (kill, restart, pause, resume); and nodetool.

``start`` and ``env`` end by printing shell-sourceable ``KEY=VALUE`` lines on stdout (two for
the single-node set, four for the cluster); everything else goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence

from . import topology
from .cassandra_node import CassandraServer
from .redis_node import RedisServer, cluster_not_ready, form_cluster, wait_node_in_cluster
from .server import Server
from .settings import ClusterSettings, ServiceError, Settings, say
from .topology import Topology

COMMANDS = ("start", "stop", "status", "env", "kill", "restart", "pause", "resume", "browser")
FAULTS = ("kill", "restart", "pause", "resume")
PEERS_TIMEOUT_S = 60.0
PAXOS_TIMEOUT_S = 240.0


def load(clustered: bool) -> tuple[Topology, list[str]]:
    """The set of servers and the lines ``env`` prints for it."""
    settings = Settings.from_env()
    if not clustered:
        return topology.single(settings), settings.env_lines()
    cluster_settings = ClusterSettings.from_env(settings)
    return topology.cluster(cluster_settings), cluster_settings.env_lines()


def start(servers: Topology, chosen: list[Server]) -> None:
    began = time.monotonic()
    redis = [s for s in chosen if isinstance(s, RedisServer)]
    cassandra = [s for s in chosen if isinstance(s, CassandraServer)]
    for node in redis:
        node.start()
    if servers.clustered and redis:
        every = servers.redis_nodes()
        if len(redis) == len(every):
            form_cluster(every, servers.redis_nodes()[0].dir.parent / ".redis-cluster.lock")
        else:
            wait_node_in_cluster(redis[0], every)
    redis_s = time.monotonic() - began
    # Cassandra nodes join one at a time: each must be up before the next one starts.
    for server in cassandra:
        server.start()
    if servers.clustered and cassandra:
        wait_for_peers(servers.cassandra_nodes())
        wait_for_paxos(servers.cassandra_nodes())
    if servers.clustered:
        total = time.monotonic() - began
        say(f"cluster ready in {total:.1f}s (redis {redis_s:.1f}s, "
            f"cassandra {total - redis_s:.1f}s)")


def wait_for_peers(nodes: list[CassandraServer]) -> None:
    """Every running node lists every other node as a peer (gossip has spread the ring);
    nodes that are not running (stopped or killed on purpose) are not asked."""
    started = time.monotonic()
    want = len(nodes) - 1
    running = [node for node in nodes if node.running_pid() is not None]
    while True:
        seen = {node.name: node.peers_seen() for node in running}
        if all(count == want for count in seen.values()):
            return
        if time.monotonic() - started > PEERS_TIMEOUT_S:
            raise ServiceError(f"cassandra nodes do not see each other after "
                               f"{PEERS_TIMEOUT_S:.0f}s (peers seen: {seen})")
        time.sleep(1.0)


def wait_for_paxos(nodes: list[CassandraServer]) -> None:
    """Three lightweight transactions in a row succeed through every running node (follows
    are LWTs; a cold cluster timed them out for its first minutes, which failed the first
    tests run on it). Waits up to PAXOS_TIMEOUT_S."""
    started = time.monotonic()
    running = [node for node in nodes if node.running_pid() is not None]
    streak = {node.name: 0 for node in running}
    attempt = 0
    error = ""
    while min(streak.values(), default=3) < 3:
        attempt += 1
        for node in running:
            if streak[node.name] < 3:
                error = node.conditional_write(len(nodes), attempt)
                streak[node.name] = 0 if error else streak[node.name] + 1
        if time.monotonic() - started > PAXOS_TIMEOUT_S:
            raise ServiceError(f"lightweight transactions still fail after "
                               f"{PAXOS_TIMEOUT_S:.0f}s: {error}")
        if error:
            time.sleep(2.0)
    say(f"lightweight transactions go through every node ({time.monotonic() - started:.1f}s)")


def stop(chosen: list[Server]) -> None:
    failures = []
    for server in reversed(chosen):
        try:
            server.stop()
        except ServiceError as exc:
            failures.append(str(exc))
    if failures:
        raise ServiceError("\n".join(failures))


def status(servers: Topology, chosen: list[Server]) -> None:
    for server in chosen:
        print(server.status_line(), flush=True)
    redis = [s for s in chosen if isinstance(s, RedisServer)]
    if servers.clustered and redis:
        every = servers.redis_nodes()
        reason = cluster_not_ready(every)
        state = f"whole: {len(every)} nodes, replicas in sync" if reason is None else reason
        print(f"{'redis-cluster':<14} {state}", flush=True)


def restart(servers: Topology, server: Server) -> None:
    server.stop()
    server.start()
    if servers.clustered and isinstance(server, RedisServer):
        wait_node_in_cluster(server, servers.redis_nodes())
    if servers.clustered and isinstance(server, CassandraServer):
        wait_for_peers(servers.cassandra_nodes())


def run(command: str, names: Sequence[str], clustered: bool) -> int:
    if command == "browser":
        # Not a server: the headless browser and its driver that the status page's test
        # drives (Debian's chromium and chromium-driver, installed with apt when missing).
        from .install import browser_binaries

        chromium, driver = browser_binaries()
        print(f"chromium={chromium}\nchromedriver={driver}", flush=True)
        return 0
    servers, env_lines = load(clustered)
    if command == "env":
        if names:
            raise ServiceError("`env` takes no server names")
        print("\n".join(env_lines), flush=True)
        return 0
    if command in FAULTS and not names:
        raise ServiceError(f"`{command}` needs the servers to act on, e.g. "
                           f"`{command} {'--cluster cassandra-2' if clustered else 'redis'}`")
    chosen = servers.select(names)
    if command == "start":
        start(servers, chosen)
        print("\n".join(env_lines), flush=True)
    elif command == "stop":
        stop(chosen)
    elif command == "status":
        status(servers, chosen)
    elif command == "restart":
        for server in chosen:
            restart(servers, server)
    else:
        faults: dict[str, Callable[[Server], None]] = {
            "kill": Server.kill, "pause": Server.pause, "resume": Server.resume}
        for server in chosen:
            faults[command](server)
    return 0


def nodetool(args: list[str]) -> int:
    """``nodetool ARGS`` against the single node; ``nodetool --cluster [cassandra-N] ARGS``
    against one cluster node, or each in turn when none is named."""
    if args[:1] != ["--cluster"]:
        node = topology.single(Settings.from_env()).cassandra_nodes()[0]
        return node.nodetool(args)
    nodes = load(True)[0].cassandra_nodes()
    named = [node for node in nodes if args[1:2] == [node.name]]
    if named:
        return named[0].nodetool(args[2:])
    if args[1:2] and args[1].startswith("cassandra-"):
        names = ", ".join(node.name for node in nodes)
        raise ServiceError(f"unknown cluster node {args[1]!r}; choose from {names}")
    worst = 0
    for node in nodes:
        say(f"nodetool {' '.join(args[1:])} on {node.name}")
        worst = max(worst, node.nodetool(args[1:]))
    return worst


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["nodetool"]:
        # Everything after `nodetool` is nodetool's own, e.g. `nodetool settimeout write 500`.
        try:
            return nodetool(args_list[1:])
        except ServiceError as exc:
            print(f"services.py nodetool: error: {exc}", file=sys.stderr, flush=True)
            return 1
    parser = argparse.ArgumentParser(
        prog="services.py",
        description="Run feedsvc's local Redis and Cassandra servers on 127.0.0.1, or "
        "(--cluster) a three-node Cassandra cluster on 127.0.0.1-3 and a six-node Redis "
        "Cluster.",
        epilog="`services.py nodetool [--cluster [cassandra-N]] ARGS...` runs Cassandra's "
        "nodetool against the local node (or cluster nodes). kill (SIGKILL), pause (SIGSTOP), "
        "resume (SIGCONT) and restart take server names, e.g. `kill --cluster cassandra-2` "
        "or `kill --cluster redis-primary`. `browser` installs Debian's chromium and "
        "chromium-driver when missing (the status page test). See docs/local-servers.md for ports, "
        "directories and environment overrides.",
    )
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument(
        "servers", nargs="*", metavar="server",
        help="redis and/or cassandra (default: both); with --cluster also a node name: "
        "redis-1..redis-6, redis-primary, cassandra-1..cassandra-3",
    )
    parser.add_argument("--cluster", action="store_true",
                        help="act on the cluster instead of the single-node set")
    args = parser.parse_intermixed_args(args_list)
    try:
        return run(args.command, args.servers, args.cluster)
    except ServiceError as exc:
        print(f"services.py {args.command}: error: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(
            f"services.py {args.command}: interrupted; a server may still be starting, "
            "see `status` or run `stop`",
            file=sys.stderr,
            flush=True,
        )
        return 130
