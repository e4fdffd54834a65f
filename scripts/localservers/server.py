"""One server's life cycle: start (or reuse, or adopt), wait until it answers, stop, kill.

``Server`` holds what every server shares; ``RedisServer`` and ``CassandraServer`` fill in
the command line, the config files and the readiness probe. Each server owns one state
directory (config, pid file, logs, data) and a lock file in it, so that two concurrent
commands never start the same server twice.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from .process import (
    all_pids,
    file_lock,
    launch_detached,
    log_excerpt,
    pid_alive,
    pid_stopped,
    port_in_use,
    process_cmdline,
    read_pid,
    signal_and_wait,
    write_atomically,
)
from .settings import ServiceError, say

STOP_GRACE_S = 60.0
KILL_WAIT_S = 15.0


class Server:
    """What start/stop/status need from one server; subclasses fill in the specifics."""

    ready_timeout_s = 60.0

    def __init__(self, name: str, kind: str, directory: Path, host: str,
                 label_width: int = 10) -> None:
        self.name = name  # what commands call it: redis, cassandra, cassandra-2, redis-4
        self.kind = kind  # redis or cassandra: names the files in its directory
        self.host = host
        self.dir = directory
        self.pid_file = self.dir / f"{kind}.pid"
        self.lock_file = self.dir / ".lock"
        self.label_width = label_width

    # -- to override
    def ports(self) -> list[tuple[str, str, int]]:
        """(what, host, port) for every port the server listens on."""
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

    def status_detail(self) -> str:
        """Extra words for a status line of a running server (e.g. a Redis node's role)."""
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
            if pid_stopped(pid):
                raise ServiceError(f"{self.name} (pid {pid}) is paused (SIGSTOP): resume it first")
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
        busy = [f"{what} {host}:{port}" for what, host, port in self.ports()
                if port_in_use(host, port)]
        if busy:
            raise ServiceError(
                f"cannot start {self.name}: {', '.join(busy)} is already in use "
                "by another process (see `ss -ltnp`); free it or choose other ports with the "
                "FEEDSVC_LOCAL_*_PORT (or FEEDSVC_CLUSTER_*_PORT) variables"
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
            for pid in pids:  # a paused server cannot act on SIGTERM
                if pid_stopped(pid):
                    signal_and_wait([pid], signal.SIGCONT, 0)
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

    # -- faults, for the chaos tests: no lock, no grace, immediate
    def kill(self) -> None:
        """SIGKILL, as a crash would: the pid file stays (``start`` finds it stale) and so
        does everything on disk."""
        pids = self.our_pids()
        if not pids:
            say(f"{self.name} is not running; nothing to kill")
            return
        left = signal_and_wait(pids, signal.SIGKILL, KILL_WAIT_S)
        if left:
            raise ServiceError(f"{self.name} processes still alive after SIGKILL: {left}")
        say(f"killed {self.name} (SIGKILL, pid {', '.join(map(str, pids))})")

    def pause(self) -> None:
        """SIGSTOP: the process holds its sockets but answers nothing (a hung server)."""
        pids = self.our_pids()
        if not pids:
            raise ServiceError(f"{self.name} is not running; nothing to pause")
        signal_and_wait(pids, signal.SIGSTOP, 0)
        say(f"paused {self.name} (SIGSTOP, pid {', '.join(map(str, pids))})")

    def resume(self) -> None:
        pids = self.our_pids()
        if not pids:
            raise ServiceError(f"{self.name} is not running; nothing to resume")
        signal_and_wait(pids, signal.SIGCONT, 0)
        say(f"resumed {self.name} (SIGCONT, pid {', '.join(map(str, pids))})")

    def status_line(self) -> str:
        label = f"{self.name:<{self.label_width}}"
        pid = self.running_pid()
        if pid is None:
            orphans = self.our_pids()
            if orphans:
                return (
                    f"{label} running without pid file (pid "
                    f"{', '.join(map(str, orphans))}); run `stop` to clean up"
                )
            stale = " (stale pid file)" if self.pid_file.exists() else ""
            return f"{label} stopped{stale}"
        if pid_stopped(pid):
            return f"{label} paused    pid {pid:<8} {self.endpoint()}  (SIGSTOP; `resume`)"
        health = "answering" if self.answers() else "NOT answering"
        detail = self.status_detail()
        line = f"{label} running   pid {pid:<8} {self.endpoint()}  {health}"
        return f"{line}  {detail}" if detail else line
