#!/usr/bin/env python3
"""Start, stop and inspect the local Redis and Cassandra servers that feedsvc develops against.

Usage (from the repo root):

    .venv/bin/python scripts/services.py start  [redis|cassandra ...]
    .venv/bin/python scripts/services.py stop   [redis|cassandra ...]
    .venv/bin/python scripts/services.py status [redis|cassandra ...]
    .venv/bin/python scripts/services.py env
    .venv/bin/python scripts/services.py nodetool ARGS...

and the same with ``--cluster`` for a three-node Cassandra cluster on 127.0.0.1-127.0.0.3
and a Redis Cluster of three primaries with one replica each, plus the faults the chaos
tests inject: ``kill``, ``restart``, ``pause``, ``resume`` NAME (e.g. ``kill --cluster
cassandra-2``).

Without server names a command applies to every server of the set. ``start`` and ``env``
end by printing shell-sourceable lines on stdout (FEEDSVC_CASSANDRA_HOSTS=...,
FEEDSVC_REDIS_URL=..., and for the cluster FEEDSVC_REDIS_CLUSTER and FEEDSVC_REPLICATION);
every progress message goes to stderr, so ``eval "$(... start)"`` or ``... start > .env``
work.

The work is done by the ``localservers`` package next to this file (its ``__init__`` lists
the modules). See docs/local-servers.md for ports, directories and environment overrides.
"""

from __future__ import annotations

import sys

from localservers.cli import main

if __name__ == "__main__":
    sys.exit(main())
