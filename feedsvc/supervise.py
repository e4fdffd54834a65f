"""Several processes of one command: ``feedsvc api --processes N`` and ``feedsvc worker
--processes N`` (default: one per core).

Python runs one core per process, so a machine's cores are used by separate processes. The
parent forks the children before any event loop, connection or thread exists, then only
supervises: SIGTERM or SIGINT to the parent reaches every child, which stops as a single
process does; a child that fails stops the others and the parent exits with an error (the
process manager restarts the whole); a child ends with its parent if the parent is killed
(``PR_SET_PDEATHSIG`` on Linux).

API processes share the port: each child gets its own listening socket with
``SO_REUSEPORT``, all bound by the parent to the same address (the first one picks the port
when it is 0), so the kernel spreads new connections over the children and a child never
competes with another on one accept queue.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def default_processes() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)


def reuse_port_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` listening sockets on one address, each with ``SO_REUSEPORT``."""
    if not hasattr(socket, "SO_REUSEPORT"):
        raise OSError("SO_REUSEPORT is not available: run one API process per port")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            port = sock.getsockname()[1]
            sock.listen(1024)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _die_with_parent(parent: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def run_children(count: int, child: Callable[[int], int]) -> int:
    """Fork ``count`` children running ``child(index)`` (its return value is the child's
    exit status) and supervise them; returns 0 when all ended cleanly, else 1."""
    parent = os.getpid()
    children: dict[int, int] = {}
    sys.stdout.flush()
    sys.stderr.flush()
    for index in range(count):
        pid = os.fork()
        if pid == 0:  # the child
            status = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                _die_with_parent(parent)
                status = child(index)
            except KeyboardInterrupt:
                status = 0
            except BaseException:
                log.exception("process %d ended with an error", index)
            finally:
                logging.shutdown()
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
        children[pid] = index

    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    failed = False
    try:
        while children:
            pid, status = os.wait()
            index = children.pop(pid, -1)
            if index < 0:
                continue
            code = os.waitstatus_to_exitcode(status)
            if code != 0 and not stopping:
                log.error("process %d (pid %d) ended with status %d: stopping the others",
                          index, pid, code)
                failed = True
                stop(signal.SIGTERM, None)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 1 if failed else 0
