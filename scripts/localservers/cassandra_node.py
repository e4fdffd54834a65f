"""A Cassandra 5.0 node: ``java -cp 'lib/*' org.apache.cassandra.service.CassandraDaemon``
with a generated cassandra.yaml, ready when the Python driver can read ``system.local``
through it; and ``nodetool`` from the same jars over the node's local JMX port.

The single-node set runs one (``cassandra``, seed of itself); the cluster runs three
(``cassandra-1`` .. ``cassandra-3`` on 127.0.0.1 .. 127.0.0.3, ``cassandra-1`` the seed).
"""

from __future__ import annotations

import importlib
import logging
import os
import subprocess
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape as xml_escape

from .install import find_java, java_major_version
from .jars import ensure_jars
from .process import tcp_open, write_atomically
from .server import Server
from .settings import LOOPBACK, ServiceError, say

CASSANDRA_READY_TIMEOUT_S = 300.0

# nodetool runs from the server's jars; without a configuration of its own it logs at DEBUG.
TOOLS_LOGBACK = """<?xml version="1.0" encoding="UTF-8"?>
<configuration scan="false">
  <appender name="STDERR" class="ch.qos.logback.core.ConsoleAppender">
    <target>System.err</target>
    <encoder><pattern>%-5level %logger{0} - %msg%n</pattern></encoder>
  </appender>
  <root level="WARN"><appender-ref ref="STDERR"/></root>
</configuration>
"""

JVM_ADD_EXPORTS = (
    "java.base/jdk.internal.misc",
    "java.management.rmi/com.sun.jmx.remote.internal.rmi",
    "java.management/com.sun.jmx.remote.security",
    "java.rmi/sun.rmi.registry",
    "java.rmi/sun.rmi.server",
    "java.sql/java.sql",
    "java.base/java.lang.ref",
    "jdk.unsupported/sun.misc",
)
JVM_ADD_OPENS = (
    "java.base/java.lang.module",
    "java.base/jdk.internal.loader",
    "java.base/jdk.internal.ref",
    "java.base/jdk.internal.reflect",
    "java.base/jdk.internal.math",
    "java.base/jdk.internal.module",
    "java.base/jdk.internal.util.jar",
    "jdk.management/com.sun.management.internal",
    "java.base/sun.nio.ch",
    "java.base/java.io",
    "java.base/java.lang.reflect",
    "java.base/java.lang",
    "java.base/java.util",
    "java.base/java.nio",
)


def module_access_flags() -> list[str]:
    """The JDK module exports and opens Cassandra's classes need (server and nodetool)."""
    flags: list[str] = []
    for module in JVM_ADD_EXPORTS:
        flags += ["--add-exports", f"{module}=ALL-UNNAMED"]
    for module in JVM_ADD_OPENS:
        flags += ["--add-opens", f"{module}=ALL-UNNAMED"]
    return flags


def full_jdk_flags(java: str) -> list[str]:
    """Extra flags Cassandra's own scripts add when the JDK modules are present."""
    try:
        result = subprocess.run(
            [java, "--list-modules"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    modules = {line.split("@", 1)[0].strip() for line in result.stdout.splitlines()}
    flags: list[str] = []
    if "jdk.attach" in modules:
        flags += ["--add-exports", "jdk.attach/sun.tools.attach=ALL-UNNAMED"]
    if "jdk.compiler" in modules:
        flags += [
            "--add-exports",
            "jdk.compiler/com.sun.tools.javac.file=ALL-UNNAMED",
            "--add-opens",
            "jdk.compiler/com.sun.tools.javac=ALL-UNNAMED",
        ]
    return flags


def _quiet_driver() -> tuple[Any, Any]:
    try:
        cluster_mod = importlib.import_module("cassandra.cluster")
    except ImportError as exc:
        raise ServiceError(
            "the readiness probe needs cassandra-driver: run this script with the project's "
            f"venv (.venv/bin/python) after `pip install -e '.[dev]'` ({exc})"
        ) from exc
    logging.getLogger("cassandra").setLevel(logging.CRITICAL)
    return cluster_mod, importlib.import_module("cassandra.policies")


def cql_rows(host: str, port: int, query: str) -> tuple[list[Any] | None, str]:
    """Run one query through this node only; return (rows, error text)."""
    if not tcp_open(host, port):
        return None, f"nothing listens on {host}:{port} yet"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cluster_mod, policies = _quiet_driver()
        profile = cluster_mod.ExecutionProfile(
            load_balancing_policy=policies.WhiteListRoundRobinPolicy([host]),
            request_timeout=10,
        )
        cluster = cluster_mod.Cluster(
            [host],
            port=port,
            connect_timeout=5,
            control_connection_timeout=5,
            execution_profiles={cluster_mod.EXEC_PROFILE_DEFAULT: profile},
        )
        try:
            session = cluster.connect()
            return list(session.execute(query)), ""
        except Exception as exc:
            return None, f"{type(exc).__name__}: {exc}"
        finally:
            cluster.shutdown()


def cql_script(host: str, port: int, statements: Sequence[str]) -> str:
    """Run statements in order through this node only (QUORUM, SERIAL for conditional
    ones); return "" or the first error's text."""
    if not tcp_open(host, port):
        return f"nothing listens on {host}:{port}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cluster_mod, policies = _quiet_driver()
        consistency = importlib.import_module("cassandra").ConsistencyLevel
        profile = cluster_mod.ExecutionProfile(
            load_balancing_policy=policies.WhiteListRoundRobinPolicy([host]),
            request_timeout=15, consistency_level=consistency.QUORUM,
            serial_consistency_level=consistency.SERIAL,
        )
        cluster = cluster_mod.Cluster(
            [host], port=port, connect_timeout=5, control_connection_timeout=5,
            execution_profiles={cluster_mod.EXEC_PROFILE_DEFAULT: profile},
        )
        try:
            session = cluster.connect()
            for statement in statements:
                session.execute(statement)
            return ""
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        finally:
            cluster.shutdown()


def probe_cql(host: str, port: int) -> tuple[str | None, str]:
    """Run SELECT release_version FROM system.local; return (version, error text)."""
    rows, error = cql_rows(host, port, "SELECT release_version FROM system.local")
    if not rows:
        return None, error
    return str(rows[0][0]), ""


@dataclass(frozen=True)
class CassandraNode:
    """Where one node listens, whom it asks to join, and how big it is."""

    name: str
    directory: Path
    host: str
    cql_port: int
    storage_port: int
    jmx_port: int  # local JMX, always on 127.0.0.1
    seeds: str  # "host:storage_port,..."
    cluster_name: str
    initial_token: int
    heap: str
    cache_dir: Path
    fast: bool
    # A node of a fresh test cluster: nothing to stream from the others when it joins.
    join_without_bootstrap: bool = False
    label_width: int = 10


class CassandraServer(Server):
    ready_timeout_s = CASSANDRA_READY_TIMEOUT_S

    def __init__(self, node: CassandraNode) -> None:
        super().__init__(node.name, "cassandra", node.directory, node.host, node.label_width)
        self.node = node
        self.conf_file = self.dir / "cassandra.yaml"
        self.logback_file = self.dir / "logback.xml"
        self.data_dir = self.dir / "data"
        self.tmp_dir = self.dir / "tmp"
        self.triggers_dir = self.dir / "triggers"
        self.log_file = self.dir / "cassandra.log"
        self.console_file = self.dir / "console.log"
        self.fetch_log = self.dir / "fetch.log"
        self._probe_error = ""

    def ports(self) -> list[tuple[str, str, int]]:
        return [
            ("CQL port", self.host, self.node.cql_port),
            ("storage port", self.host, self.node.storage_port),
            ("JMX port", LOOPBACK, self.node.jmx_port),
        ]

    def endpoint(self) -> str:
        return f"{self.host}:{self.node.cql_port}"

    def log_files(self) -> list[Path]:
        return [self.log_file, self.console_file]

    def matches(self, cmdline: list[str]) -> bool:
        return (
            "org.apache.cassandra.service.CassandraDaemon" in cmdline
            and f"-Dcassandra.config={self.conf_file.as_uri()}" in cmdline
        )

    def answers(self) -> bool:
        version, self._probe_error = probe_cql(self.host, self.node.cql_port)
        return version is not None

    def last_probe_error(self) -> str:
        return self._probe_error

    def peers_seen(self) -> int | None:
        """How many other nodes this node lists in system.peers_v2 (None: no answer)."""
        rows, _ = cql_rows(self.host, self.node.cql_port, "SELECT peer FROM system.peers_v2")
        return None if rows is None else len(rows)

    # -- config
    def conditional_write(self, replicas: int, attempt: int) -> str:
        """One lightweight transaction through this node on a keyspace replicated to
        ``replicas`` nodes: "" when it went through. A cluster that has just formed can
        see every peer and still time out Paxos rounds for a while."""
        return cql_script(self.host, self.node.cql_port, [
            "CREATE KEYSPACE IF NOT EXISTS localservers_probe WITH replication = "
            f"{{'class': 'NetworkTopologyStrategy', 'datacenter1': {replicas}}}",
            "CREATE TABLE IF NOT EXISTS localservers_probe.paxos (k text PRIMARY KEY, v int)",
            f"INSERT INTO localservers_probe.paxos (k, v) VALUES ('{self.name}', {attempt}) "
            "IF NOT EXISTS",
            f"UPDATE localservers_probe.paxos SET v = {attempt + 1} WHERE k = '{self.name}' "
            "IF v != -1",
        ])

    def yaml_text(self) -> str:
        n = self.node
        if n.join_without_bootstrap:
            about = (f"# Node {n.name} of a local test cluster ({n.host}); seeds: {n.seeds}.\n"
                     "# A fresh cluster has no data to stream, so nodes join without bootstrap.")
        else:
            about = "# Single loopback node for local development and tests."
        bootstrap = "auto_bootstrap: false\n" if n.join_without_bootstrap else ""
        return f"""\
# Generated by scripts/services.py on every start; edits are overwritten.
{about} Data, commitlog, hints and saved
# caches live under -Dcassandra.storagedir (set on the command line).
cluster_name: {n.cluster_name}
num_tokens: 1
initial_token: {n.initial_token}
{bootstrap}partitioner: org.apache.cassandra.dht.Murmur3Partitioner
endpoint_snitch: SimpleSnitch
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "{n.seeds}"
listen_address: {n.host}
rpc_address: {n.host}
storage_port: {n.storage_port}
native_transport_port: {n.cql_port}
start_native_transport: true
commitlog_sync: periodic
commitlog_sync_period: 10000ms
commitlog_segment_size: 5MiB
auto_snapshot: false
compaction_throughput: 0MiB/s
concurrent_compactors: 1
hinted_handoff_enabled: false
# feedsvc writes fan-out rows as unlogged batches grouped by replica (up to 40 KB, below the
# default 50KiB fail threshold); warn only on batches larger than that, not on every one.
batch_size_warn_threshold: 48KiB
unlogged_batch_across_partitions_warn_threshold: 1000
"""

    def logback_text(self) -> str:
        log = xml_escape(str(self.log_file))
        return f"""\
<?xml version="1.0" encoding="UTF-8"?>
<!-- Generated by scripts/services.py on every start; edits are overwritten. -->
<configuration scan="false">
  <appender name="FILE" class="ch.qos.logback.core.rolling.RollingFileAppender">
    <file>{log}</file>
    <rollingPolicy class="ch.qos.logback.core.rolling.SizeAndTimeBasedRollingPolicy">
      <fileNamePattern>{log}.%d{{yyyy-MM-dd}}.%i.gz</fileNamePattern>
      <maxFileSize>50MB</maxFileSize>
      <maxHistory>7</maxHistory>
      <totalSizeCap>500MB</totalSizeCap>
    </rollingPolicy>
    <encoder>
      <pattern>%-5level [%thread] %date{{ISO8601}} %logger{{0}} - %msg%n</pattern>
    </encoder>
  </appender>
  <root level="INFO">
    <appender-ref ref="FILE"/>
  </root>
</configuration>
"""

    def jvm_command(self, java: str, lib: Path) -> list[str]:
        jamm = sorted(lib.glob("jamm-*.jar"))
        cmd = [
            java,
            f"-Xms{self.node.heap}",
            f"-Xmx{self.node.heap}",
            "-Xss256k",
            "-XX:+UseG1GC",
            "-XX:+ExitOnOutOfMemoryError",
            f"-XX:ErrorFile={self.dir / 'hs_err_pid%p.log'}",
        ]
        if jamm:
            cmd.append(f"-javaagent:{jamm[-1]}")
        cmd.append("-Djdk.attach.allowAttachSelf=true")
        cmd += module_access_flags()
        cmd += full_jdk_flags(java)
        cmd += [
            "-Dio.netty.tryReflectionSetAccessible=true",
            "-Djava.net.preferIPv4Stack=true",
            f"-Dcassandra.config={self.conf_file.as_uri()}",
            f"-Dcassandra.storagedir={self.data_dir}",
            "-Dcassandra-foreground=yes",
            f"-Dlogback.configurationFile={self.logback_file}",
            f"-Dcassandra.logdir={self.dir}",
            f"-Dcassandra.jmx.local.port={self.node.jmx_port}",
            f"-Djna.tmpdir={self.tmp_dir}",
            f"-Dcassandra.triggers_dir={self.triggers_dir}",
            "-Dcassandra.skip_wait_for_gossip_to_settle=0",
            "-Dcassandra.ring_delay_ms=1000",
            "-Dcassandra.superuser_setup_delay_ms=0",
            "-Dcassandra.libjemalloc=-",
        ]
        if self.node.fast:
            # No fsync and non-durable system tables: quicker, but a crash may lose data.
            cmd += ["-Dcassandra.skip_sync=true", "-Dcassandra.unsafesystem=true"]
        cmd += ["-cp", f"{lib}{os.sep}*", "org.apache.cassandra.service.CassandraDaemon"]
        return cmd

    def nodetool(self, args: Sequence[str]) -> int:
        """Run Cassandra's nodetool (from the same jars) against this node over its local JMX
        port; its output goes to this process's stdout and stderr."""
        if not self.answers():
            raise ServiceError(f"{self.name} is not running at {self.endpoint()}: start it first")
        java = find_java()
        lib = ensure_jars(self.node.cache_dir, java, self.fetch_log)
        tools_log = self.dir / "logback-tools.xml"
        write_atomically(tools_log, TOOLS_LOGBACK)
        cmd = [java, "-Xmx256m", f"-Dlogback.configurationFile={tools_log.as_uri()}"]
        cmd += module_access_flags()
        cmd += ["-cp", str(lib / "*"), "org.apache.cassandra.tools.NodeTool",
                "-h", LOOPBACK, "-p", str(self.node.jmx_port), *args]
        return subprocess.run(cmd, check=False).returncode

    def prepare(self) -> list[str]:
        _quiet_driver()  # fail early, with advice, when the probe cannot run
        java = find_java()
        say(f"using {java} (Java {java_major_version(java)})")
        lib = ensure_jars(self.node.cache_dir, java, self.fetch_log)
        for directory in (self.data_dir, self.tmp_dir, self.triggers_dir):
            directory.mkdir(parents=True, exist_ok=True)
        write_atomically(self.conf_file, self.yaml_text())
        write_atomically(self.logback_file, self.logback_text())
        return self.jvm_command(java, lib)
