#!/usr/bin/env python3
"""Start, stop and inspect the local Redis and Cassandra servers that feedsvc develops against.

Usage (from the repo root):

    .venv/bin/python scripts/services.py start  [redis|cassandra ...]
    .venv/bin/python scripts/services.py stop   [redis|cassandra ...]
    .venv/bin/python scripts/services.py status [redis|cassandra ...]
    .venv/bin/python scripts/services.py env

Without server names a command applies to both servers. ``start`` and ``env`` end by printing
two shell-sourceable lines on stdout (FEEDSVC_CASSANDRA_HOSTS=..., FEEDSVC_REDIS_URL=...); every
progress message goes to stderr, so ``eval "$(... start)"`` or ``... start > .env`` work.

Both servers listen on 127.0.0.1 only. Redis is Debian's ``redis-server``; Cassandra is the
``cassandra-all`` jar and its dependencies from Maven Central (see scripts/cassandra-pom/pom.xml)
run with ``java -cp 'lib/*' org.apache.cassandra.service.CassandraDaemon``. See
docs/local-servers.md for ports, directories and environment overrides.

Only the standard library is used, except ``cassandra-driver`` (imported lazily) for the
Cassandra readiness probe.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree
from xml.sax.saxutils import escape as xml_escape

SCRIPT_DIR = Path(__file__).resolve().parent
REPO_ROOT = SCRIPT_DIR.parent
CASSANDRA_POM = SCRIPT_DIR / "cassandra-pom" / "pom.xml"

LOOPBACK = "127.0.0.1"
SERVER_NAMES = ("redis", "cassandra")

DEFAULT_REDIS_PORT = 16379
DEFAULT_CQL_PORT = 19042
DEFAULT_STORAGE_PORT = 17000
DEFAULT_JMX_PORT = 17199
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

REDIS_READY_TIMEOUT_S = 60.0
CASSANDRA_READY_TIMEOUT_S = 300.0
STOP_GRACE_S = 60.0
KILL_WAIT_S = 15.0
LOG_TAIL_LINES = 40
SUPPORTED_JAVA_MAJORS = (11, 17)

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


class ServiceError(Exception):
    """A failure reported to the user as one clear message (exit status 1)."""


def say(message: str) -> None:
    print(f"[services] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- settings


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


def _default_cache_dir() -> Path:
    explicit = os.environ.get("FEEDSVC_CACHE_DIR", "").strip()
    if explicit:
        return Path(explicit).expanduser().absolute()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return (base / "feedsvc").absolute()


@dataclass(frozen=True)
class Settings:
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


# --------------------------------------------------------------------------- small helpers


@contextlib.contextmanager
def file_lock(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive fcntl lock on ``path`` (created if missing) for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"another services.py run holds the {what} lock ({path}); waiting for it")
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def read_pid(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def process_state(pid: int) -> str | None:
    """The one-letter state from /proc/<pid>/stat, or None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[0] if fields else None


def pid_alive(pid: int) -> bool:
    state = process_state(pid)
    return state is not None and state not in ("Z", "X")


def process_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def all_pids() -> list[int]:
    own = os.getpid()
    return [int(name) for name in os.listdir("/proc") if name.isdigit() and int(name) != own]


def tail_lines(path: Path, count: int = LOG_TAIL_LINES) -> list[str]:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 256 * 1024))
            data = handle.read()
    except FileNotFoundError:
        return []
    return data.decode(errors="replace").splitlines()[-count:]


def log_excerpt(*paths: Path) -> str:
    parts = []
    for path in paths:
        lines = tail_lines(path)
        if lines:
            parts.append(f"--- last {len(lines)} lines of {path} ---\n" + "\n".join(lines))
        else:
            parts.append(f"--- {path} is empty or missing ---")
    return "\n".join(parts)


def signal_and_wait(pids: list[int], sig: signal.Signals, wait_s: float) -> list[int]:
    """Send ``sig`` to every pid, wait up to ``wait_s`` for them to exit; the survivors."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and any(pid_alive(pid) for pid in pids):
        time.sleep(0.2)
    return [pid for pid in pids if pid_alive(pid)]


def port_in_use(port: int) -> bool:
    """True when something already listens on (or holds) 127.0.0.1:<port>."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return True
    return False


def tcp_open(port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout):
            return True
    except OSError:
        return False


def is_root() -> bool:
    return os.geteuid() == 0


_apt_updated = False


def apt_install(packages: Sequence[str], reason: str) -> None:
    """Install Debian packages when running as root; otherwise explain what to install."""
    global _apt_updated
    names = " ".join(packages)
    if not is_root() or shutil.which("apt-get") is None:
        raise ServiceError(
            f"{reason}. Install it first, e.g. `sudo apt-get install -y {names}` "
            "(or your platform's equivalent), then run this command again."
        )
    say(f"{reason}; installing {names} with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    apt = ["apt-get", "-o", "DPkg::Lock::Timeout=300"]
    out = sys.stderr.fileno()
    # A policy-rc.d that answers 101 stops the package's own init/systemd service from being
    # started while installing (Debian's redis-server would otherwise run on port 6379). Ours
    # is a separate process with its own port, config and data, so that instance never matters;
    # this merely avoids leaving an unused server behind. An existing policy-rc.d is left alone.
    policy = Path("/usr/sbin/policy-rc.d")
    placed_policy = False
    if not policy.exists():
        with contextlib.suppress(OSError):
            policy.write_text("#!/bin/sh\n# temporary, placed by feedsvc services.py\nexit 101\n")
            policy.chmod(0o755)
            placed_policy = True
    try:
        if not _apt_updated:
            subprocess.run([*apt, "update"], env=env, stdout=out, check=True)
            _apt_updated = True
        subprocess.run(
            [*apt, "install", "-y", "--no-install-recommends", *packages],
            env=env,
            stdout=out,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        raise ServiceError(f"apt-get could not install {names}: {exc}") from exc
    finally:
        if placed_policy:
            policy.unlink(missing_ok=True)


def launch_detached(cmd: Sequence[str], output: Path, cwd: Path) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in its own session with stdin closed and stdout/stderr appended to a file."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("ab") as out:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        out.write(f"\n=== {stamp} services.py starting: {cmd[0]} ===\n".encode())
        out.flush()
        return subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
        )


# --------------------------------------------------------------------------- servers


class Server:
    """What start/stop/status need from one server; subclasses fill in the specifics."""

    name = ""
    ready_timeout_s = 60.0

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.dir = settings.state_dir / self.name
        self.pid_file = self.dir / f"{self.name}.pid"
        self.lock_file = self.dir / ".lock"

    # -- to override
    def ports(self) -> dict[str, int]:
        raise NotImplementedError

    def endpoint(self) -> str:
        raise NotImplementedError

    def matches(self, cmdline: list[str]) -> bool:
        """True when a process command line is this server, run from this state dir."""
        raise NotImplementedError

    def answers(self) -> bool:
        raise NotImplementedError

    def prepare(self) -> list[str]:
        """Install what is missing, write the config files; return the command to run."""
        raise NotImplementedError

    def log_files(self) -> list[Path]:
        raise NotImplementedError

    def last_probe_error(self) -> str:
        return ""

    # -- shared behaviour
    def our_pids(self) -> list[int]:
        """Live processes of this server (pid file first, then a /proc scan for orphans)."""
        found: list[int] = []
        recorded = read_pid(self.pid_file)
        if recorded is not None and pid_alive(recorded) and self.matches(process_cmdline(recorded)):
            found.append(recorded)
        for pid in all_pids():
            if pid not in found and pid_alive(pid) and self.matches(process_cmdline(pid)):
                found.append(pid)
        return found

    def running_pid(self) -> int | None:
        recorded = read_pid(self.pid_file)
        if recorded is not None and pid_alive(recorded) and self.matches(process_cmdline(recorded)):
            return recorded
        return None

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with file_lock(self.lock_file, self.name):
            self._start_locked()

    def _start_locked(self) -> None:
        pid = self.running_pid()
        if pid is not None:
            if self.answers():
                say(f"{self.name} is already running (pid {pid}) on {self.endpoint()}; reusing it")
                return
            say(f"{self.name} (pid {pid}) is running but not answering yet; waiting for it")
            self._wait_ready(pid, None, time.monotonic())
            return
        stale = read_pid(self.pid_file)
        if stale is not None:
            say(f"removing stale {self.name} pid file (pid {stale} is not running)")
            self.pid_file.unlink(missing_ok=True)
        orphans = self.our_pids()
        if orphans:
            pid = orphans[0]
            say(f"found {self.name} running without a pid file (pid {pid}); adopting it")
            write_atomically(self.pid_file, f"{pid}\n")
            self._wait_ready(pid, None, time.monotonic())
            return
        busy = [f"{what} {port}" for what, port in self.ports().items() if port_in_use(port)]
        if busy:
            raise ServiceError(
                f"cannot start {self.name}: {', '.join(busy)} on {LOOPBACK} is already in use "
                "by another process (see `ss -ltnp`); free it or choose other ports with the "
                "FEEDSVC_LOCAL_*_PORT variables"
            )
        cmd = self.prepare()
        say(f"starting {self.name} on {self.endpoint()} (state in {self.dir})")
        started = time.monotonic()
        proc = launch_detached(cmd, self.console_log(), self.dir)
        write_atomically(self.pid_file, f"{proc.pid}\n")
        self._wait_ready(proc.pid, proc, started)

    def console_log(self) -> Path:
        return self.log_files()[-1]

    def _wait_ready(self, pid: int, proc: subprocess.Popen[bytes] | None, started: float) -> None:
        deadline = started + self.ready_timeout_s
        while True:
            exit_code = proc.poll() if proc is not None else None
            if exit_code is not None or not pid_alive(pid):
                self.pid_file.unlink(missing_ok=True)
                how = f"exited with status {exit_code}" if exit_code is not None else "exited"
                raise ServiceError(
                    f"{self.name} (pid {pid}) {how} before it was ready\n"
                    + log_excerpt(*self.log_files())
                )
            if self.answers():
                elapsed = time.monotonic() - started
                say(f"{self.name} ready in {elapsed:.1f}s (pid {pid}, {self.endpoint()})")
                return
            if time.monotonic() > deadline:
                detail = self.last_probe_error()
                say(f"{self.name} did not become ready in {self.ready_timeout_s:.0f}s; stopping it")
                self._terminate([pid])
                self.pid_file.unlink(missing_ok=True)
                raise ServiceError(
                    f"{self.name} (pid {pid}) was not ready after {self.ready_timeout_s:.0f}s"
                    + (f" (last probe error: {detail})" if detail else "")
                    + "\n"
                    + log_excerpt(*self.log_files())
                )
            # Poll quickly at first (Redis is up in well under a second), then back off.
            time.sleep(0.1 if time.monotonic() - started < 3 else 0.5)

    def stop(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with file_lock(self.lock_file, self.name):
            pids = self.our_pids()
            if not pids:
                if self.pid_file.exists():
                    self.pid_file.unlink()
                    say(f"{self.name} is not running (removed a stale pid file)")
                else:
                    say(f"{self.name} is not running")
                return
            started = time.monotonic()
            say(f"stopping {self.name} (pid {', '.join(map(str, pids))})")
            self._terminate(pids)
            self.pid_file.unlink(missing_ok=True)
            say(f"{self.name} stopped in {time.monotonic() - started:.1f}s")

    def _terminate(self, pids: list[int]) -> None:
        """SIGTERM, wait up to STOP_GRACE_S, then SIGKILL; fail if anything is left."""
        stubborn = signal_and_wait(pids, signal.SIGTERM, STOP_GRACE_S)
        if stubborn:
            say(f"{self.name} still running after {STOP_GRACE_S:.0f}s; sending SIGKILL")
            signal_and_wait(stubborn, signal.SIGKILL, KILL_WAIT_S)
        left = [pid for pid in pids if pid_alive(pid)] + [
            pid for pid in self.our_pids() if pid not in pids
        ]
        if left:
            raise ServiceError(f"{self.name} processes still alive after SIGKILL: {left}")

    def status_line(self) -> str:
        pid = self.running_pid()
        if pid is None:
            orphans = self.our_pids()
            if orphans:
                return (
                    f"{self.name:<10} running without pid file (pid "
                    f"{', '.join(map(str, orphans))}); run `stop` to clean up"
                )
            stale = " (stale pid file)" if self.pid_file.exists() else ""
            return f"{self.name:<10} stopped{stale}"
        health = "answering" if self.answers() else "NOT answering"
        return f"{self.name:<10} running   pid {pid:<8} {self.endpoint()}  {health}"


# --------------------------------------------------------------------------- redis


def redis_ping(port: int, timeout: float = 1.0) -> bool:
    """Send a RESP PING over a raw socket; True only for a +PONG reply."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            reply = b""
            while not reply.endswith(b"\r\n") and len(reply) < 4096:
                chunk = sock.recv(1024)
                if not chunk:
                    break
                reply += chunk
    except OSError:
        return False
    return reply.startswith(b"+PONG")


def redis_quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class RedisServer(Server):
    name = "redis"
    ready_timeout_s = REDIS_READY_TIMEOUT_S

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.port = settings.redis_port
        self.conf_file = self.dir / "redis.conf"
        self.data_dir = self.dir / "data"
        self.log_file = self.dir / "redis.log"

    def ports(self) -> dict[str, int]:
        return {"redis port": self.port}

    def endpoint(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def log_files(self) -> list[Path]:
        return [self.log_file]

    def matches(self, cmdline: list[str]) -> bool:
        # `set-proc-title no` below keeps argv as we passed it: <binary> <our redis.conf>.
        return (
            len(cmdline) >= 2
            and Path(cmdline[0]).name.startswith("redis-server")
            and cmdline[1] == str(self.conf_file)
        )

    def answers(self) -> bool:
        return redis_ping(self.port)

    def binary(self) -> str:
        for candidate in (shutil.which("redis-server"), "/usr/bin/redis-server"):
            if candidate and os.access(candidate, os.X_OK):
                return candidate
        apt_install(["redis-server"], "redis-server is not installed")
        found = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not os.access(found, os.X_OK):
            raise ServiceError("redis-server is still missing after installing it")
        return found

    def prepare(self) -> list[str]:
        binary = self.binary()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = "\n".join(
            [
                "# Generated by scripts/services.py on every start; edits are overwritten.",
                f"bind {LOOPBACK}",
                "protected-mode yes",
                f"port {self.port}",
                "daemonize no",
                "supervised no",
                "set-proc-title no",
                f"pidfile {redis_quote(str(self.pid_file))}",
                f"logfile {redis_quote(str(self.log_file))}",
                "loglevel notice",
                f"dir {redis_quote(str(self.data_dir))}",
                "appendonly yes",
                "appendfsync everysec",
                "save 3600 1 300 100 60 10000",
                "",
            ]
        )
        write_atomically(self.conf_file, config)
        return [binary, str(self.conf_file)]


# --------------------------------------------------------------------------- cassandra


def module_access_flags() -> list[str]:
    """The JDK module exports and opens Cassandra's classes need (server and nodetool)."""
    flags: list[str] = []
    for module in JVM_ADD_EXPORTS:
        flags += ["--add-exports", f"{module}=ALL-UNNAMED"]
    for module in JVM_ADD_OPENS:
        flags += ["--add-opens", f"{module}=ALL-UNNAMED"]
    return flags


def cassandra_version() -> str:
    """The version pinned in scripts/cassandra-pom/pom.xml (the only place it is written)."""
    try:
        root = ElementTree.parse(CASSANDRA_POM).getroot()
    except (OSError, ElementTree.ParseError) as exc:
        raise ServiceError(f"cannot read {CASSANDRA_POM}: {exc}") from exc
    namespace = root.tag.partition("}")[0] + "}" if root.tag.startswith("{") else ""
    node = root.find(f"{namespace}properties/{namespace}cassandra.version")
    if node is None or not (node.text or "").strip():
        raise ServiceError(f"{CASSANDRA_POM} has no <cassandra.version> property")
    return (node.text or "").strip()


def java_major_version(java: str) -> int | None:
    try:
        result = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', result.stderr + result.stdout)
    if match is None:
        return None
    major = int(match.group(1))
    if major == 1 and match.group(2):  # "1.8.0_..." style
        major = int(match.group(2))
    return major


def java_candidates() -> list[str]:
    candidates: list[str] = []
    java_home = os.environ.get("JAVA_HOME", "").strip()
    if java_home:
        candidates.append(str(Path(java_home) / "bin" / "java"))
    on_path = shutil.which("java")
    if on_path:
        candidates.append(on_path)
    jvm_root = Path("/usr/lib/jvm")
    if jvm_root.is_dir():
        candidates.extend(str(path) for path in sorted(jvm_root.glob("*/bin/java"), reverse=True))
    unique: list[str] = []
    seen: set[str] = set()
    for candidate in candidates:
        resolved = os.path.realpath(candidate)
        if resolved not in seen and os.access(resolved, os.X_OK):
            seen.add(resolved)
            unique.append(candidate)
    return unique


def find_java() -> str:
    wrong: list[str] = []
    for attempt in range(2):
        for candidate in java_candidates():
            major = java_major_version(candidate)
            if major in SUPPORTED_JAVA_MAJORS:
                return candidate
            wrong.append(f"{candidate} (Java {major if major is not None else '?'})")
        if attempt == 0:
            found = "; found " + ", ".join(wrong) if wrong else ""
            apt_install(
                ["openjdk-17-jre-headless"],
                f"Cassandra 5.0 needs Java 11 or 17 and none was found{found}",
            )
    raise ServiceError("no Java 11 or 17 found even after installing openjdk-17-jre-headless")


def find_maven() -> str:
    found = shutil.which("mvn")
    if found:
        return found
    apt_install(["maven"], "Maven (mvn) is needed once to fetch the Cassandra jars")
    found = shutil.which("mvn")
    if not found:
        raise ServiceError("mvn is still missing after installing maven")
    return found


def java_home_of(java: str) -> Path:
    return Path(os.path.realpath(java)).parent.parent


def probe_cql(port: int) -> tuple[str | None, str]:
    """Run SELECT release_version FROM system.local; return (version, error text)."""
    if not tcp_open(port):
        return None, f"nothing listens on {LOOPBACK}:{port} yet"
    logging.getLogger("cassandra").setLevel(logging.CRITICAL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cluster_mod = importlib.import_module("cassandra.cluster")
        policies = importlib.import_module("cassandra.policies")
        profile = cluster_mod.ExecutionProfile(
            load_balancing_policy=policies.WhiteListRoundRobinPolicy([LOOPBACK]),
            request_timeout=10,
        )
        cluster = cluster_mod.Cluster(
            [LOOPBACK],
            port=port,
            connect_timeout=5,
            control_connection_timeout=5,
            execution_profiles={cluster_mod.EXEC_PROFILE_DEFAULT: profile},
        )
        try:
            session = cluster.connect()
            row = session.execute("SELECT release_version FROM system.local").one()
            return (str(row[0]) if row is not None else None), ""
        except Exception as exc:
            return None, f"{type(exc).__name__}: {exc}"
        finally:
            cluster.shutdown()


class CassandraServer(Server):
    name = "cassandra"
    ready_timeout_s = CASSANDRA_READY_TIMEOUT_S

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.conf_file = self.dir / "cassandra.yaml"
        self.logback_file = self.dir / "logback.xml"
        self.data_dir = self.dir / "data"
        self.tmp_dir = self.dir / "tmp"
        self.triggers_dir = self.dir / "triggers"
        self.log_file = self.dir / "cassandra.log"
        self.console_file = self.dir / "console.log"
        self.fetch_log = self.dir / "fetch.log"
        self._probe_error = ""

    def ports(self) -> dict[str, int]:
        return {
            "CQL port": self.settings.cql_port,
            "storage port": self.settings.storage_port,
            "JMX port": self.settings.jmx_port,
        }

    def endpoint(self) -> str:
        return f"{LOOPBACK}:{self.settings.cql_port}"

    def log_files(self) -> list[Path]:
        return [self.log_file, self.console_file]

    def matches(self, cmdline: list[str]) -> bool:
        return (
            "org.apache.cassandra.service.CassandraDaemon" in cmdline
            and f"-Dcassandra.config={self.conf_file.as_uri()}" in cmdline
        )

    def answers(self) -> bool:
        version, self._probe_error = probe_cql(self.settings.cql_port)
        return version is not None

    def last_probe_error(self) -> str:
        return self._probe_error

    # -- jars
    def ensure_jars(self, java: str) -> Path:
        version = cassandra_version()
        cache = self.settings.cache_dir
        final = cache / f"cassandra-{version}"
        lib = final / "lib"
        marker = f"cassandra-all-{version}.jar"
        if (lib / marker).is_file():
            return lib
        cache.mkdir(parents=True, exist_ok=True)
        with file_lock(cache / f"cassandra-{version}.lock", "jar download"):
            if (lib / marker).is_file():  # fetched by a concurrent run while we waited
                return lib
            mvn = find_maven()
            say(f"fetching cassandra-all {version} and its dependencies with Maven into {lib}")
            say(f"(one-time download, tens of MB; Maven output goes to {self.fetch_log})")
            started = time.monotonic()
            staging = Path(tempfile.mkdtemp(prefix=f".cassandra-{version}-", dir=cache))
            try:
                cmd = [
                    mvn,
                    "-B",
                    "-ntp",
                    "-f",
                    str(CASSANDRA_POM),
                    f"-Dfeedsvc.lib.dir={staging / 'lib'}",
                    f"-Dfeedsvc.build.dir={staging / 'target'}",
                    "dependency:copy-dependencies",
                ]
                env = dict(os.environ, JAVA_HOME=str(java_home_of(java)))
                self.fetch_log.parent.mkdir(parents=True, exist_ok=True)
                with self.fetch_log.open("wb") as log:
                    result = subprocess.run(
                        cmd, stdout=log, stderr=subprocess.STDOUT, env=env, check=False
                    )
                if result.returncode != 0 or not (staging / "lib" / marker).is_file():
                    raise ServiceError(
                        f"Maven could not fetch the Cassandra jars (exit {result.returncode})\n"
                        + log_excerpt(self.fetch_log)
                    )
                shutil.rmtree(staging / "target", ignore_errors=True)
                if final.exists():  # an incomplete leftover from an older layout or a crash
                    shutil.rmtree(final)
                os.rename(staging, final)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            jars = list(lib.glob("*.jar"))
            size_mb = sum(jar.stat().st_size for jar in jars) / 1e6
            say(f"fetched {len(jars)} jars ({size_mb:.0f} MB) in {time.monotonic() - started:.1f}s")
        return lib

    # -- config
    def yaml_text(self) -> str:
        s = self.settings
        return f"""\
# Generated by scripts/services.py on every start; edits are overwritten.
# Single loopback node for local development and tests. Data, commitlog, hints and saved
# caches live under -Dcassandra.storagedir (set on the command line).
cluster_name: feedsvc-local
num_tokens: 1
initial_token: 0
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
endpoint_snitch: SimpleSnitch
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "{LOOPBACK}:{s.storage_port}"
listen_address: {LOOPBACK}
rpc_address: {LOOPBACK}
storage_port: {s.storage_port}
native_transport_port: {s.cql_port}
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
            "-Xms1g",
            "-Xmx1g",
            "-Xss256k",
            "-XX:+UseG1GC",
            "-XX:+ExitOnOutOfMemoryError",
            f"-XX:ErrorFile={self.dir / 'hs_err_pid%p.log'}",
        ]
        if jamm:
            cmd.append(f"-javaagent:{jamm[-1]}")
        cmd.append("-Djdk.attach.allowAttachSelf=true")
        cmd += module_access_flags()
        cmd += self._full_jdk_flags(java)
        cmd += [
            "-Dio.netty.tryReflectionSetAccessible=true",
            "-Djava.net.preferIPv4Stack=true",
            f"-Dcassandra.config={self.conf_file.as_uri()}",
            f"-Dcassandra.storagedir={self.data_dir}",
            "-Dcassandra-foreground=yes",
            f"-Dlogback.configurationFile={self.logback_file}",
            f"-Dcassandra.logdir={self.dir}",
            f"-Dcassandra.jmx.local.port={self.settings.jmx_port}",
            f"-Djna.tmpdir={self.tmp_dir}",
            f"-Dcassandra.triggers_dir={self.triggers_dir}",
            "-Dcassandra.skip_wait_for_gossip_to_settle=0",
            "-Dcassandra.ring_delay_ms=1000",
            "-Dcassandra.superuser_setup_delay_ms=0",
            "-Dcassandra.libjemalloc=-",
        ]
        if self.settings.fast:
            # No fsync and non-durable system tables: quicker, but a crash may lose data.
            cmd += ["-Dcassandra.skip_sync=true", "-Dcassandra.unsafesystem=true"]
        cmd += ["-cp", f"{lib}{os.sep}*", "org.apache.cassandra.service.CassandraDaemon"]
        return cmd

    @staticmethod
    def _full_jdk_flags(java: str) -> list[str]:
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

    def nodetool(self, args: Sequence[str]) -> int:
        """Run Cassandra's nodetool (from the same jars) against this node over its local JMX
        port; its output goes to this process's stdout and stderr."""
        if not self.answers():
            raise ServiceError(f"cassandra is not running at {self.endpoint()}: start it first")
        java = find_java()
        lib = self.ensure_jars(java)
        tools_log = self.dir / "logback-tools.xml"
        write_atomically(tools_log, TOOLS_LOGBACK)
        cmd = [java, "-Xmx256m", f"-Dlogback.configurationFile={tools_log.as_uri()}"]
        cmd += module_access_flags()
        cmd += ["-cp", str(lib / "*"), "org.apache.cassandra.tools.NodeTool",
                "-h", LOOPBACK, "-p", str(self.settings.jmx_port), *args]
        return subprocess.run(cmd, check=False).returncode

    def prepare(self) -> list[str]:
        try:
            importlib.import_module("cassandra.cluster")
        except ImportError as exc:
            raise ServiceError(
                "the readiness probe needs cassandra-driver: run this script with the project's "
                f"venv (.venv/bin/python) after `pip install -e '.[dev]'` ({exc})"
            ) from exc
        java = find_java()
        say(f"using {java} (Java {java_major_version(java)})")
        lib = self.ensure_jars(java)
        for directory in (self.data_dir, self.tmp_dir, self.triggers_dir):
            directory.mkdir(parents=True, exist_ok=True)
        write_atomically(self.conf_file, self.yaml_text())
        write_atomically(self.logback_file, self.logback_text())
        return self.jvm_command(java, lib)


# --------------------------------------------------------------------------- commands


def make_servers(settings: Settings, names: Sequence[str]) -> list[Server]:
    wanted = list(dict.fromkeys(names)) or list(SERVER_NAMES)
    unknown = [name for name in wanted if name not in SERVER_NAMES]
    if unknown:
        raise ServiceError(f"unknown server {unknown[0]!r}; choose from {', '.join(SERVER_NAMES)}")
    classes: dict[str, type[Server]] = {"redis": RedisServer, "cassandra": CassandraServer}
    return [classes[name](settings) for name in SERVER_NAMES if name in wanted]


def run(command: str, names: Sequence[str]) -> int:
    settings = Settings.from_env()
    if command == "env":
        if names:
            raise ServiceError("`env` takes no server names")
        print("\n".join(settings.env_lines()), flush=True)
        return 0
    servers = make_servers(settings, names)
    if command == "start":
        for server in servers:
            server.start()
        print("\n".join(settings.env_lines()), flush=True)
        return 0
    if command == "stop":
        failures = []
        for server in reversed(servers):
            try:
                server.stop()
            except ServiceError as exc:
                failures.append(str(exc))
        if failures:
            raise ServiceError("\n".join(failures))
        return 0
    if command == "status":
        for server in servers:
            print(server.status_line(), flush=True)
        return 0
    raise ServiceError(f"unknown command {command!r}")


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["nodetool"]:
        # Everything after `nodetool` is nodetool's own, e.g. `nodetool settimeout write 500`.
        try:
            return CassandraServer(Settings.from_env()).nodetool(args_list[1:])
        except ServiceError as exc:
            print(f"services.py nodetool: error: {exc}", file=sys.stderr, flush=True)
            return 1
    parser = argparse.ArgumentParser(
        prog="services.py",
        description="Run feedsvc's local Redis and Cassandra servers on 127.0.0.1.",
        epilog="`services.py nodetool ARGS...` runs Cassandra's nodetool against the local "
        "node. See docs/local-servers.md for ports, directories and environment overrides.",
    )
    parser.add_argument("command", choices=("start", "stop", "status", "env"))
    parser.add_argument(
        "servers", nargs="*", metavar="server", help="redis and/or cassandra (default: both)"
    )
    args = parser.parse_args(args_list)
    try:
        return run(args.command, args.servers)
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


if __name__ == "__main__":
    sys.exit(main())
