"""``feedsvc`` command line: serve | api | worker | migrate | seed | token | dlq | status.

Every setting is an environment variable (``FEEDSVC_*``) and also a flag; flags win.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import uvloop

from feedsvc import logs, multiproc
from feedsvc.config import Settings, add_arguments
from feedsvc.errors import ConfigError, FeedError

log = logging.getLogger("feedsvc")

DEMO_SERVICE_KEY = "dev-service-key"
DEMO_JWT_SECRET = "dev-only-jwt-secret-change-me-before-production"


def _run(main: Coroutine[Any, Any, int]) -> int:
    """Run ``main`` until it returns or SIGINT/SIGTERM arrives."""

    async def wrapper() -> int:
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(main)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        try:
            return await task
        except asyncio.CancelledError:
            return 0

    # uvloop: the event loop costs a visible share of a fan-out worker's CPU otherwise.
    return uvloop.run(wrapper())


def cmd_serve(settings: Settings, args: argparse.Namespace, *, workers: int) -> int:
    from feedsvc.api.app import serve

    if args.demo:
        settings = settings.replace(
            service_keys=settings.service_keys or (DEMO_SERVICE_KEY,),
            jwt_secret=settings.jwt_secret or DEMO_JWT_SECRET,
            # Notifications of the demo are written to the log by the console provider.
            console_channels=settings.console_channels or ("push", "sms", "email"),
        )

        async def with_demo() -> int:
            await _seed_demo(settings)
            _print_demo(settings)
            await serve(settings, workers=workers)
            return 0

        return _run(with_demo())

    processes = getattr(args, "processes", None) or 1
    if processes > 1:
        return _api_processes(settings, processes)

    async def main() -> int:
        await serve(settings, workers=workers)
        return 0

    return _run(main())


def _api_processes(settings: Settings, processes: int) -> int:
    """``feedsvc api --processes N``: N API processes on one port (SO_REUSEPORT)."""
    from feedsvc.api.app import serve
    from feedsvc.supervise import reuse_port_sockets, run_children

    sockets = reuse_port_sockets(settings.host, settings.port, processes)
    port = sockets[0].getsockname()[1]
    log.info("feedsvc API: %d processes on http://%s:%d", processes, settings.host, port)

    def child(index: int) -> int:
        for i, other in enumerate(sockets):
            if i != index:
                other.close()

        async def main() -> int:
            await serve(settings, workers=0, sock=sockets[index])
            return 0

        return _run(main())

    try:
        return run_children(processes, child)
    finally:
        for sock in sockets:
            sock.close()


def _processes(settings: Settings, args: argparse.Namespace) -> int:
    """``--processes`` resolved: one per core unless given; the embedded backend's files
    take one process."""
    from feedsvc.supervise import default_processes

    if settings.embedded:
        if args.processes not in (None, 1):
            raise ConfigError("--processes: the embedded backend runs in one process "
                              "(set FEEDSVC_CASSANDRA_HOSTS and FEEDSVC_REDIS_URL for more)")
        return 1
    return int(args.processes or default_processes())


async def _seed_demo(settings: Settings) -> None:
    from feedsvc import graph
    from feedsvc.delivery.recipients import Contacts, Device
    from feedsvc.runtime import open_runtime

    async with open_runtime(settings) as rt:
        pairs = [(f"user{i}", f"user{j}") for i in range(1, 6) for j in range(1, 6) if i != j]
        await graph.follow_many(rt, pairs)
        for i in range(2, 6):
            await rt.recipients.put_device(f"user{i}", Device("phone", "fcm",
                                                              token=f"demo-token-{i}"))
            await rt.recipients.put_contacts(f"user{i}", Contacts(
                f"user{i}@example.com", f"+1415555010{i}", True, True))


def _print_demo(settings: Settings) -> None:
    from feedsvc.auth import issue_token

    assert settings.jwt_secret is not None
    base = f"http://{settings.host}:{settings.port}"
    key = settings.service_keys[0]
    token = issue_token(settings.jwt_secret, "user2", ttl_s=86_400)
    print(f"""
feedsvc (embedded backend, data in {settings.data_dir}/) on {base}
Demo graph: user1..user5 all follow each other. Dev credentials (do not use in production):

  export FEEDSVC_KEY={key}
  export USER_TOKEN={token}

Post an event as user1 (the posting service, with the service key):

  curl -s -X POST {base}/v1/events -H "Authorization: Bearer $FEEDSVC_KEY" \\
       -H 'Content-Type: application/json' \\
       -d '{{"event_id": "demo-1", "author_id": "user1", "kind": "post",
            "payload": {{"text": "hello"}}}}'

Read user2's inbox (a mobile client, with user2's token):

  curl -s {base}/v1/inbox -H "Authorization: Bearer $USER_TOKEN"

Notify user1's followers on every channel (the demo's console provider writes each
delivery to this log; see who got what with the delivery log):

  curl -s -X POST {base}/v1/events -H "Authorization: Bearer $FEEDSVC_KEY" \\
       -H 'Content-Type: application/json' \\
       -d '{{"event_id": "demo-2", "author_id": "user1", "kind": "alert", "payload": {{}},
            "notify": {{"channels": ["push", "sms", "email"],
                       "message": {{"title": "School closed", "body": "No school tomorrow"}}}}}}'
  curl -s {base}/v1/events/demo-2/deliveries/user2 -H "Authorization: Bearer $USER_TOKEN"

Status page (asks for the service key above): {base}/status
""", flush=True)


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    from feedsvc.delivery.providers.registry import open_providers
    from feedsvc.queue.base import QUEUES
    from feedsvc.runtime import freeze_startup_heap, open_runtime
    from feedsvc.workers import run_workers

    queues = tuple(q.strip() for q in args.queues.split(",") if q.strip())
    unknown = [q for q in queues if q not in QUEUES]
    if unknown or not queues:
        raise ConfigError(f"--queues takes a comma list of {', '.join(QUEUES)}")
    processes = _processes(settings, args)
    if processes > 1:
        from feedsvc.supervise import run_children

        args.processes = 1
        return run_children(processes, lambda index: cmd_worker(settings, args))

    providers = open_providers(settings)
    if set(queues) - {"fanout"}:
        providers.warn_unconfigured()

    async def main() -> int:
        from feedsvc.api.ops import metrics_server
        from feedsvc.ops import reporting

        try:
            async with open_runtime(settings) as rt:
                freeze_startup_heap()
                stop = asyncio.Event()
                try:
                    async with metrics_server(rt, settings.host, args.metrics_port), \
                            reporting(rt, "worker", queues):
                        done = await run_workers(rt, args.concurrency, stop,
                                                 burst=args.burst, queues=queues,
                                                 providers=providers, senders=args.senders)
                finally:
                    stop.set()
                log.info("worker processed %d entries", done)
        finally:
            await providers.aclose()
        return 0

    return _run(main())


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    from feedsvc.migrate import migrate
    from feedsvc.store.cassandra import connect_cluster

    if settings.embedded:
        print("migrate: FEEDSVC_CASSANDRA_HOSTS is not set (the embedded backend creates "
              "its schema itself)", file=sys.stderr)
        return 2
    hosts = ",".join(settings.cassandra_hosts)
    try:
        cluster, session = connect_cluster(settings.cassandra_hosts)
    except Exception as exc:  # NoHostAvailable, OperationTimedOut, DNS errors, ...
        print(f"migrate: cannot reach Cassandra at {hosts} ({_first_line(exc)}); check that "
              "the node is up and FEEDSVC_CASSANDRA_HOSTS names it", file=sys.stderr)
        return 1
    try:
        applied = migrate(session, settings.keyspace, settings.replication)
    finally:
        cluster.shutdown()
    print(f"migrate: keyspace {settings.keyspace}: applied {applied or 'nothing (up to date)'}")
    return 0


def _first_line(exc: BaseException) -> str:
    errors = getattr(exc, "errors", None)  # NoHostAvailable: {host: exception}
    if isinstance(errors, dict) and errors:
        exc = next(iter(errors.values()))
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


class _DriverOneLine(logging.Filter):
    """The Cassandra driver logs a traceback with every failed connection attempt; at the
    command line that is one line (the message), never a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("cassandra"):
            record.exc_info = None
            record.exc_text = None
        return True


def cmd_token(settings: Settings, args: argparse.Namespace) -> int:
    from feedsvc.auth import issue_token
    from feedsvc.intake import valid_id

    if not settings.jwt_secret:
        raise ConfigError("FEEDSVC_JWT_SECRET must be set to issue tokens")
    if not valid_id(args.user_id):
        raise ConfigError(f"{args.user_id!r} is not a valid user id")
    print(issue_token(settings.jwt_secret, args.user_id, ttl_s=args.ttl))
    return 0


def cmd_seed(settings: Settings, args: argparse.Namespace) -> int:
    from feedsvc.seed import seed

    async def main() -> int:
        await seed(settings, users=args.users, follows_per_user=args.follows,
                   alpha=args.alpha, seed=args.seed)
        return 0

    return _run(main())


def cmd_dlq(settings: Settings, args: argparse.Namespace) -> int:
    """``dlq [list]``: statistics and the newest dead letters; ``dlq show ID``; ``dlq replay
    ID ... | --all``: put tasks back on their queues (a fan-out redone rewrites the same
    rows, so replaying something that had half succeeded duplicates nothing)."""
    import msgspec

    from feedsvc.runtime import open_queue

    def show(letter: object) -> None:
        print(msgspec.json.encode(letter).decode())

    async def main() -> int:
        queue = await open_queue(settings)
        try:
            if args.action == "list":
                show(await queue.stats())
                for letter in await queue.dead_letters(args.limit):
                    show(letter)
                return 0
            if args.action == "show":
                missing = 0
                for dlq_id in args.ids:
                    found = await queue.dead_letter_get(dlq_id)
                    if found is None:
                        print(f"dlq: no dead letter {dlq_id}", file=sys.stderr)
                        missing += 1
                    else:
                        show(found)
                return 1 if missing else 0
            ids = list(args.ids)
            if args.all:
                while batch := await queue.dead_letters(500, ids[-1] if ids else None):
                    ids += [letter.dlq_id for letter in batch]
            replayed = [dlq_id for dlq_id in ids if await queue.replay(dlq_id)]
            print(f"dlq: replayed {len(replayed)} of {len(ids)}")
            return 0 if len(replayed) == len(ids) else 1
        finally:
            await queue.close()

    if args.action in ("show", "replay") and not (args.ids or args.all):
        raise ConfigError(f"dlq {args.action} needs dead-letter ids"
                          + (" or --all" if args.action == "replay" else ""))
    return _run(main())


def _set_processes(settings: Settings, args: argparse.Namespace) -> argparse.Namespace:
    args.processes = _processes(settings, args)
    return args


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    from feedsvc.console import run

    return _run(run(settings, url=args.url, key=args.key, watch=args.watch,
                    interval=args.interval, as_json=args.json))


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="feedsvc", description=__doc__)
    parser.add_argument("--log-level", default=os.environ.get("FEEDSVC_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True)
    commands: dict[str, Callable[[Settings, argparse.Namespace], int]] = {}

    def command(name: str, help_text: str,
                fn: Callable[[Settings, argparse.Namespace], int],
                only: Sequence[str] | None = None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        add_arguments(p, only)
        commands[name] = fn
        p.set_defaults(handler=fn)
        return p

    serve_p = command("serve", "API plus in-process workers (embedded backend by default)",
                      lambda s, a: cmd_serve(s, a, workers=a.workers))
    serve_p.add_argument("--workers", type=_positive, default=2,
                         help="fan-out consumers in this process")
    serve_p.add_argument("--demo", action="store_true",
                         help="seed a small demo graph, use dev credentials if none are set, "
                              "and print ready-to-paste curl commands")
    api_p = command("api", "the HTTP API only (run `feedsvc worker` separately)",
                    lambda s, a: cmd_serve(s, _set_processes(s, a), workers=0))
    api_p.set_defaults(demo=False)
    api_p.add_argument("--processes", type=_positive, default=None,
                       help="API processes sharing the port (default: one per core; the "
                            "embedded backend: 1)")
    worker_p = command("worker", "fan-out and delivery workers", cmd_worker)
    worker_p.add_argument("--concurrency", type=_positive, default=4)
    worker_p.add_argument("--senders", type=_count, default=16,
                          help="more consumers for the push/sms/email queues only (a send "
                               "mostly waits on its provider); 0 for none")
    worker_p.add_argument("--queues", default="fanout,push,sms,email",
                          help="the queues these consumers serve (default: all of them)")
    worker_p.add_argument("--burst", action="store_true",
                          help="drain the queue, then exit")
    worker_p.add_argument("--processes", type=_positive, default=None,
                          help="worker processes, each with --concurrency consumers "
                               "(default: one per core; the embedded backend: 1)")
    worker_p.add_argument("--metrics-port", type=_positive, default=None,
                          help="serve GET /metrics (Prometheus) on this port, on FEEDSVC_HOST")
    command("migrate", "apply cql/NNN_*.cql to the keyspace", cmd_migrate,
            ["cassandra_hosts", "keyspace", "replication", "redis_url"])
    seed_p = command("seed", "synthetic follow graph with power-law follower counts", cmd_seed)
    seed_p.add_argument("--users", type=_positive, default=10_000)
    seed_p.add_argument("--follows", type=_positive, default=20,
                        help="average authors followed per user")
    seed_p.add_argument("--alpha", type=float, default=1.0, help="Zipf exponent of reach")
    seed_p.add_argument("--seed", type=int, default=1, help="random seed (reproducible)")
    token_p = command("token", "print a user token (JWT)", cmd_token, ["jwt_secret"])
    token_p.add_argument("user_id")
    token_p.add_argument("--ttl", type=_positive, default=3600, help="seconds")
    dlq_p = command("dlq", "dead letters: list (with queue statistics), show ID, "
                    "replay ID... | replay --all", cmd_dlq)
    dlq_p.add_argument("action", nargs="?", default="list", choices=("list", "show", "replay"))
    dlq_p.add_argument("ids", nargs="*", metavar="ID", help="dead-letter ids (dlq_id)")
    dlq_p.add_argument("--all", action="store_true", help="with replay: every dead letter")
    dlq_p.add_argument("--limit", type=_positive, default=20)
    status_p = command("status", "queues, rates, latencies, dead letters, backends and "
                       "processes (what GET /status shows)", cmd_status)
    status_p.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    status_p.add_argument("--interval", type=float, default=2.0, help="seconds, with --watch")
    status_p.add_argument("--json", action="store_true", help="print the JSON")
    status_p.add_argument("--url", default=None,
                          help="ask a running API (GET /v1/status) instead of the backends")
    status_p.add_argument("--key", default=None,
                          help="service key for --url (default: FEEDSVC_SERVICE_KEYS' first)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.load(os.environ, args)
    except ConfigError as exc:
        print(f"feedsvc: configuration error: {exc}", file=sys.stderr)
        return 2
    # FEEDSVC_LOG_FORMAT: text (a terminal) or json (one object per line).
    logs.configure(args.log_level, settings.log_format).addFilter(_DriverOneLine())
    if args.command not in ("serve", "api", "worker"):
        # One-shot commands say themselves what failed; a long-running process keeps the
        # driver's warnings (node down, reconnecting) as one line each.
        logging.getLogger("cassandra").setLevel(logging.CRITICAL)
    try:
        if args.command in ("api", "worker") and _processes(settings, args) > 1:
            multiproc.enable(sys.argv[1:] if argv is None else argv)  # one /metrics for all
        result: int = args.handler(settings, args)
        return result
    except ConfigError as exc:
        print(f"feedsvc: configuration error: {exc}", file=sys.stderr)
        return 2
    except FeedError as exc:
        print(f"feedsvc: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
