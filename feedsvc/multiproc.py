"""Prometheus' multiprocess mode for ``feedsvc api --processes N`` and ``feedsvc worker
--processes N``: every child writes its metrics to files in one directory, and whichever
child answers ``GET /metrics`` adds up all of them (prometheus-client's
``MultiProcessCollector``).

prometheus-client chooses how it keeps values when it is first imported, which importing
``feedsvc.config`` already does; so ``enable`` starts the command again (``exec``, same
arguments) with ``PROMETHEUS_MULTIPROC_DIR`` naming a new temporary directory, which the
supervising parent removes when it exits. A directory given in ``PROMETHEUS_MULTIPROC_DIR``
already (a process manager's own) is used as it is.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence

ENV = "PROMETHEUS_MULTIPROC_DIR"
_OWNED = "FEEDSVC_METRICS_DIR_OWNED"  # the directory this command made (and removes)


def enable(argv: Sequence[str]) -> None:
    """Make this command's processes keep multiprocess metrics (``argv``: its arguments,
    to start it again with)."""
    given = os.environ.get(ENV)
    if given:
        if os.environ.get(_OWNED) == given:
            parent = os.getpid()

            def remove() -> None:
                if os.getpid() == parent:  # never from a forked child
                    shutil.rmtree(given, ignore_errors=True)

            atexit.register(remove)
        return
    path = tempfile.mkdtemp(prefix="feedsvc-metrics-")
    env = dict(os.environ, **{ENV: path, _OWNED: path})
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "feedsvc.cli", *argv], env)
