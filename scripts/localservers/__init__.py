"""feedsvc's local servers: Redis and Cassandra as plain processes on 127.0.0.x, no Docker.

``scripts/services.py`` is the command line; this package is what it runs. The file list
follows the seams of the job:

- ``settings.py``   ports, directories and overrides (``FEEDSVC_LOCAL_*``, ``FEEDSVC_CLUSTER_*``),
                    the error every module raises and the one way to talk to the user
- ``process.py``    process supervision: pid files, locks, /proc, signals, detached launch
- ``server.py``     one server's life cycle (start, wait until ready, stop, kill, status)
- ``install.py``    what the servers need from the machine: apt packages, a JDK, Maven
- ``jars.py``       Cassandra's jars from Maven Central into the cache, once
- ``redis_node.py`` a Redis server (single or a Redis Cluster node), RESP over a raw socket,
                    and creating the Redis Cluster
- ``cassandra_node.py`` a Cassandra node: its cassandra.yaml, JVM command, probe, nodetool
- ``topology.py``   which servers make up the single-node set and the three-node cluster
- ``cli.py``        the commands: start, stop, status, env, kill, restart, pause, resume,
                    nodetool

Only the standard library, except ``cassandra-driver`` (imported lazily) for the Cassandra
readiness probe. Linux only (it reads /proc).
"""
