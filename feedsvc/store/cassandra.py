"""Production store: Apache Cassandra through cassandra-driver.

Schema: ``cql/*.cql`` (applied by ``feedsvc migrate``). Every statement is prepared once at
``open``; every call goes through ``execute_async`` bridged into asyncio (``_wait``), so no
driver call blocks the event loop. Driver exceptions become ``RetryableError`` here.
Fan-out rows are upserts sent as unlogged batches of rows that share their replicas, at
most ``concurrency`` requests in flight per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import msgspec
from cassandra import (
    ConsistencyLevel,
    DriverException,
    InvalidRequest,
    OperationTimedOut,
    RequestExecutionException,
    RequestValidationException,
    WriteTimeout,
    protocol,
)
from cassandra.cluster import (
    EXEC_PROFILE_DEFAULT,
    Cluster,
    ExecutionProfile,
    NoHostAvailable,
    ResponseFuture,
    Session,
)
from cassandra.connection import ConnectionBusy
from cassandra.policies import (
    DCAwareRoundRobinPolicy,
    ExponentialReconnectionPolicy,
    TokenAwarePolicy,
)
from cassandra.protocol import ErrorMessage
from cassandra.query import BatchStatement, BatchType, PreparedStatement, tuple_factory

from feedsvc import metrics
from feedsvc.clock import now_ms
from feedsvc.errors import ConfigError, PermanentError, RetryableError
from feedsvc.errors import InvalidRequest as InvalidInput
from feedsvc.model import MAX_FUTURE_MS, Event, InboxItem, Mode, Position
from feedsvc.store.base import OutboxRow, outbox_bucket, outbox_ttl

log = logging.getLogger(__name__)

TUPLES = "tuples"  # execution profile returning rows as plain tuples
FOLLOWER_SHARDS = 16  # partitions per author in followers_by_author
# Inbox rows per unlogged batch: bounded by count and by an estimate of the mutation size
# Cassandra checks against batch_size_fail_threshold (default 50 KiB = 51,200 bytes), kept
# at 86% of it. Cassandra counts per row the clustering and cell values (not the partition
# key) plus about 130 bytes of timestamps, TTLs and cell metadata (measured on 5.0: 130 rows
# of a 234-byte item fit, 131 do not). A batch refused as too large anyway (a cluster with a
# lower threshold) is split in two and sent again.
BATCH_ROWS = 128
BATCH_BYTES = 44_000
ROW_OVERHEAD = 160  # created_at, direct, cell metadata, TTLs and timestamps, with a margin
BUSY_RETRIES = 20  # sends refused because the sockets were full, before giving up
BUSY_PAUSE_S = 0.005  # times the attempt number
# An idempotent request (an inbox batch) the node did not apply in time (a server write
# timeout, under overload) is sent again on its own, up to TIMEOUT_TRIES sends in all, after
# pauses of 50 ms, 100 ms, ... (at most 1 s each, with jitter): failing the task would make
# the worker write all of the event's rows again. A lightweight transaction with an unsure
# outcome is asked again on the same terms (``CassandraStore._ask_until_sure``).
TIMEOUT_TRIES = 8
TIMEOUT_PAUSE_S = 0.05
BUCKET_MS = 86_400_000  # events_by_author partitions hold one day each
_PULL_SHARD = 0
_UNPAGED = {"pull_authors", "inbox_keys", "inbox_positions", "outbox_bucket"}
_SERIAL_READS = {"following_edge"}  # read through Paxos (SERIAL or LOCAL_SERIAL)
_CHECKPOINT = "fanout"  # the outbox_checkpoint row of the fan-out sweeper

_item_encoder = msgspec.msgpack.Encoder()
_item_decoder = msgspec.msgpack.Decoder(InboxItem)
_event_decoder = msgspec.msgpack.Decoder(Event)
# Protocol v5's CAS_WRITE_UNKNOWN, which the driver raises as a bare ErrorMessage: a
# lightweight transaction's proposal reached some replicas but not a quorum.
_CAS_WRITE_UNKNOWN = 0x1700
_DRIVER_ERRORS = (DriverException, RequestExecutionException, OperationTimedOut, NoHostAvailable)


class _QuietBatchWarnings(logging.Filter):
    """Replica-grouped unlogged batches are deliberate here: drop the server's
    per-request warnings about them (a log line per batch would drown real warnings)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("Unlogged batch covering" in text or "is of size" in text)


def rows_per_batch(row_bytes: int) -> int:
    """Inbox rows per unlogged batch for rows whose item, event id and author id take
    ``row_bytes``: at most ``BATCH_ROWS``, within the ``BATCH_BYTES`` estimate."""
    return max(1, min(BATCH_ROWS, BATCH_BYTES // (row_bytes + ROW_OVERHEAD)))


def replica_set(metadata: Any, keyspace: str, routing_key: bytes) -> tuple[str, ...]:
    """The nodes that own a partition (its serialized key), in a stable order."""
    return tuple(sorted(str(h.endpoint) for h in metadata.get_replicas(keyspace, routing_key)))


def replica_groups(metadata: Any, keyspace: str, user_ids: Sequence[str]) -> list[list[str]]:
    """Partition keys grouped by the replica set that owns them (one group on one node)."""
    if len(metadata.all_hosts()) == 1:
        return [list(user_ids)]
    groups: dict[tuple[str, ...], list[str]] = {}
    for user_id in user_ids:
        groups.setdefault(replica_set(metadata, keyspace, user_id.encode()), []).append(user_id)
    return list(groups.values())


def inbox_batch(ps: PreparedStatement, user_ids: Sequence[str],
                shared: tuple[bytes, ...]) -> BatchStatement:
    """An unlogged batch of inbox rows that differ only in the user id; ``shared`` holds the
    other values already serialized. Rows are added without binding again (binding every
    row costs the client more than Cassandra spends writing it), as tuples of bytes, which
    the garbage collector stops tracking after one pass; the first row's key routes it."""
    batch = BatchStatement(batch_type=BatchType.UNLOGGED)
    batch.is_idempotent = True  # upserts: safe to send again (``CassandraStore._execute``)
    batch.keyspace = ps.keyspace
    batch.routing_key = user_ids[0].encode()
    for user_id in user_ids:
        batch._add_statement_and_params(True, ps.query_id, (user_id.encode(), *shared))
    return batch


def _unlogged(bound: Sequence[Any]) -> Any:
    """One bound statement as it is, or several as an unlogged batch routed by the first;
    both idempotent (upserts: safe to send again after a write timeout)."""
    if len(bound) == 1:
        statement = bound[0]
    else:
        statement = BatchStatement(batch_type=BatchType.UNLOGGED)
        for one in bound:
            statement.add(one)
    statement.is_idempotent = True
    return statement


def follower_shard(follower_id: str) -> int:
    return zlib.crc32(follower_id.encode()) % FOLLOWER_SHARDS


def bucket_of(created_at_ms: int) -> int:
    return created_at_ms // BUCKET_MS


def parse_hosts(hosts: Sequence[str]) -> tuple[list[str], int]:
    """``["a:9042", "b"]`` -> (["a", "b"], 9042). One port for the whole cluster."""
    names, ports = [], set()
    for host in hosts:
        name, sep, port = host.rpartition(":")
        if sep and port.isdigit() and name:
            names.append(name)
            ports.add(int(port))
        else:
            names.append(host)
    if len(ports) > 1:
        raise ValueError("all FEEDSVC_CASSANDRA_HOSTS must use the same port")
    return names, ports.pop() if ports else 9042


def connect_cluster(hosts: Sequence[str], *, request_timeout: float = 30.0,
                    consistency: str = "LOCAL_QUORUM",
                    serial_consistency: str = "LOCAL_SERIAL") -> tuple[Cluster, Session]:
    """Blocking: call through ``asyncio.to_thread``. ``request_timeout`` bounds every request
    (a node that stops answering fails the request then, rather than after the driver's
    default 30 s); the reconnection delay to a node that went down is capped at 2 s, so
    service resumes within seconds of the node answering again."""
    names, port = parse_hosts(hosts)

    def profile(**kwargs: Any) -> ExecutionProfile:
        return ExecutionProfile(
            load_balancing_policy=TokenAwarePolicy(DCAwareRoundRobinPolicy()),
            request_timeout=request_timeout,
            consistency_level=ConsistencyLevel.name_to_value[consistency],
            serial_consistency_level=ConsistencyLevel.name_to_value[serial_consistency],
            **kwargs,
        )

    cluster = Cluster(
        contact_points=names, port=port, protocol_version=5,
        # Hot reads of one column take plain tuples: no namedtuple per row.
        execution_profiles={EXEC_PROFILE_DEFAULT: profile(), TUPLES: profile(
            row_factory=tuple_factory)},
        connect_timeout=min(10.0, request_timeout), control_connection_timeout=10,
        # Never give up on a node (the default schedule ends after 64 tries, about two
        # minutes at this delay: a node down longer would never be used again).
        reconnection_policy=ExponentialReconnectionPolicy(base_delay=0.25, max_delay=2.0,
                                                          max_attempts=None),
    )
    try:
        session = cluster.connect()
    except Exception:
        cluster.shutdown()
        raise
    return cluster, session


async def _wait(future: ResponseFuture) -> list[Any]:
    """Bridge a driver ResponseFuture (first page only) into an awaitable."""
    loop = asyncio.get_running_loop()
    result: asyncio.Future[list[Any]] = loop.create_future()

    def ok(rows: list[Any]) -> None:
        loop.call_soon_threadsafe(_settle, result, rows, None)

    def fail(exc: BaseException) -> None:
        loop.call_soon_threadsafe(_settle, result, None, exc)

    future.add_callbacks(ok, fail)
    try:
        return await result
    except RequestValidationException:
        raise  # the request itself is wrong: retrying cannot help; callers decide
    except WriteTimeout as exc:
        raise _WriteTimedOut(f"cassandra: {exc}") from exc
    except NoHostAvailable as exc:
        if exc.errors and all(isinstance(e, ConnectionBusy) for e in exc.errors.values()):
            raise _SocketsFull(f"cassandra: {exc}") from exc
        raise RetryableError(f"cassandra: {exc}") from exc
    except ErrorMessage as exc:  # server errors the driver has no exception class for
        raise _server_error(exc) from exc
    except OperationTimedOut as exc:
        raise _ClientTimedOut(f"cassandra: {exc}") from exc
    except _DRIVER_ERRORS as exc:
        raise RetryableError(f"cassandra: {exc}") from exc


def _server_error(exc: ErrorMessage) -> Exception:
    """A server error the driver raises as a bare ``ErrorMessage`` (no exception class of
    its own): an unknown lightweight-transaction outcome is an unsure write; a statement
    the server cannot parse or accept, or refused credentials, cannot succeed later; the
    rest (an overloaded or bootstrapping node, a server error) are worth trying again."""
    if exc.code == _CAS_WRITE_UNKNOWN:
        return _WriteTimedOut(f"cassandra: {exc}")
    if isinstance(exc, (protocol.RequestValidationException, protocol.ProtocolException,
                        protocol.BadCredentials)):
        return PermanentError(f"cassandra: {exc}")
    return RetryableError(f"cassandra: {exc}")


def _resend_pause(tries: int) -> float:
    """Seconds before sending a request again after ``tries`` unsure or refused sends: 50 ms,
    100 ms, ... at most 1 s, with jitter."""
    return float(min(1.0, TIMEOUT_PAUSE_S * 2.0 ** (tries - 1)) * random.uniform(0.5, 1.0))


class _WriteTimedOut(RetryableError):
    """The coordinator did not hear back from enough replicas within its write timeout. The
    write may or may not have been applied."""


class _ClientTimedOut(RetryableError):
    """No answer within the request timeout. The request may or may not have been applied."""


class _SocketsFull(RetryableError):
    """The driver refused to send (``ConnectionBusy``): every connection's socket buffer was
    full, the node reads slower than this process writes. Nothing was sent."""


def _settle(
    result: asyncio.Future[list[Any]], rows: list[Any] | None, exc: BaseException | None
) -> None:
    if result.done():
        return
    if exc is not None:
        result.set_exception(exc)
    else:
        result.set_result(rows if rows is not None else [])


@metrics.instrumented("cassandra")
class CassandraStore:
    """``Store`` on Cassandra; see the module docstring."""

    def __init__(self, cluster: Cluster, session: Session, keyspace: str,
                 concurrency: int = 32) -> None:
        self.cluster = cluster
        self.session = session
        # Statements name the keyspace unquoted, so Cassandra folds it to lower case; the
        # driver's metadata (replicas, keyspace list) knows it only by that name.
        self.keyspace = keyspace.lower()
        self._limit = asyncio.Semaphore(concurrency)
        self._ps: dict[str, PreparedStatement] = {}
        # Requests sent again: idempotent ones after a write timeout, lightweight
        # transactions after an unsure answer.
        self.requests_resent = 0
        default = session.get_execution_profile(EXEC_PROFILE_DEFAULT)
        self._request_timeout = float(default.request_timeout)
        self._serial_consistency = default.serial_consistency_level

    @classmethod
    async def open(cls, hosts: Sequence[str], keyspace: str, concurrency: int = 32,
                   **connect: Any) -> CassandraStore:
        """Connect and prepare; ``connect`` goes to ``connect_cluster`` (timeouts,
        consistency)."""
        try:
            cluster, session = await asyncio.to_thread(
                functools.partial(connect_cluster, hosts, **connect))
        except _DRIVER_ERRORS as exc:
            raise RetryableError(f"cannot reach Cassandra at {','.join(hosts)}: {exc}") from exc
        store = cls(cluster, session, keyspace, concurrency)
        try:
            await store._prepare()
        except BaseException:
            await store.close()
            raise
        quiet = logging.getLogger("cassandra.protocol")
        if not any(isinstance(f, _QuietBatchWarnings) for f in quiet.filters):
            quiet.addFilter(_QuietBatchWarnings())
        return store

    async def _prepare(self) -> None:
        """Check the keyspace is there and prepare every statement; a missing keyspace or
        table is a configuration error naming ``feedsvc migrate``."""
        if self.keyspace not in self.cluster.metadata.keyspaces:
            raise ConfigError(f"Cassandra has no keyspace {self.keyspace!r}: run "
                              "`feedsvc migrate` first (FEEDSVC_KEYSPACE names it)")
        try:
            await asyncio.to_thread(self._prepare_all)
        except InvalidRequest as exc:
            if "does not exist" not in str(exc) and "Undefined column" not in str(exc):
                raise
            raise ConfigError(f"keyspace {self.keyspace!r} is not migrated ({exc}): run "
                              "`feedsvc migrate`") from exc  # an older or partial migration
        except _DRIVER_ERRORS as exc:
            raise RetryableError(f"cassandra: preparing statements failed: {exc}") from exc

    def _prepare_all(self) -> None:
        ks = self.keyspace
        statements = {
            "insert_event": f"INSERT INTO {ks}.events_by_id (event_id, body) "
                            "VALUES (?, ?) IF NOT EXISTS USING TTL ?",
            "get_event": f"SELECT body FROM {ks}.events_by_id WHERE event_id = ?",
            "outbox_record": f"INSERT INTO {ks}.outbox_by_bucket (bucket, event_id) "
                             "VALUES (?, ?) USING TTL ?",
            "outbox_queued": f"UPDATE {ks}.outbox_by_bucket USING TTL ? SET queued_at = ? "
                             "WHERE bucket = ? AND event_id = ?",
            "outbox_settle": f"UPDATE {ks}.outbox_by_bucket USING TTL ? SET done = true "
                             "WHERE bucket = ? AND event_id = ?",
            "outbox_row": f"SELECT event_id, queued_at, done FROM {ks}.outbox_by_bucket "
                          "WHERE bucket = ? AND event_id = ?",
            "outbox_bucket": f"SELECT event_id, queued_at, done FROM {ks}.outbox_by_bucket "
                             "WHERE bucket = ?",
            "get_checkpoint": f"SELECT bucket FROM {ks}.outbox_checkpoint WHERE name = ?",
            "set_checkpoint": f"INSERT INTO {ks}.outbox_checkpoint (name, bucket) "
                              "VALUES (?, ?)",
            "put_author_event": f"INSERT INTO {ks}.events_by_author "
                                "(author_id, bucket, created_at, event_id, item) "
                                "VALUES (?, ?, ?, ?, ?) USING TTL ?",
            "author_events": f"SELECT item FROM {ks}.events_by_author WHERE author_id = ? "
                             "AND bucket IN ? AND created_at >= ? ORDER BY created_at DESC, "
                             "event_id DESC LIMIT ?",
            "author_events_before": f"SELECT item FROM {ks}.events_by_author WHERE "
                                    "author_id = ? AND bucket IN ? AND (created_at, event_id) "
                                    "< (?, ?) AND created_at >= ? ORDER BY created_at DESC, "
                                    "event_id DESC LIMIT ?",
            "touch_pull": f"INSERT INTO {ks}.pull_authors (shard, author_id, last_pull) "
                          "VALUES (?, ?, ?) USING TTL ?",
            "pull_authors": f"SELECT author_id, last_pull FROM {ks}.pull_authors "
                            "WHERE shard = ?",
            "write_inbox": f"INSERT INTO {ks}.inbox_by_user "
                           "(user_id, created_at, event_id, author_id, direct, item) "
                           "VALUES (?, ?, ?, ?, ?, ?) USING TTL ?",
            "read_inbox": f"SELECT item FROM {ks}.inbox_by_user WHERE user_id = ? LIMIT ?",
            "read_inbox_before": f"SELECT item FROM {ks}.inbox_by_user WHERE user_id = ? "
                                 "AND (created_at, event_id) < (?, ?) LIMIT ?",
            "inbox_keys": f"SELECT created_at, event_id, author_id, direct "
                          f"FROM {ks}.inbox_by_user WHERE user_id = ?",
            "inbox_positions": f"SELECT created_at, event_id FROM {ks}.inbox_by_user "
                               "WHERE user_id = ? LIMIT ?",
            "delete_inbox_row": f"DELETE FROM {ks}.inbox_by_user WHERE user_id = ? "
                                "AND created_at = ? AND event_id = ?",
            "trim_inbox": f"DELETE FROM {ks}.inbox_by_user WHERE user_id = ? "
                          "AND (created_at, event_id) < (?, ?)",
            "follow": f"INSERT INTO {ks}.following_by_user (user_id, author_id, op) "
                      "VALUES (?, ?, ?) IF NOT EXISTS",
            "following_edge": f"SELECT op FROM {ks}.following_by_user WHERE user_id = ? "
                              "AND author_id = ?",
            "unfollow": f"DELETE FROM {ks}.following_by_user WHERE user_id = ? "
                        "AND author_id = ? IF EXISTS",
            "add_follower": f"INSERT INTO {ks}.followers_by_author "
                            "(author_id, shard, follower_id) VALUES (?, ?, ?)",
            "remove_follower": f"DELETE FROM {ks}.followers_by_author WHERE author_id = ? "
                               "AND shard = ? AND follower_id = ?",
            "count_follow": f"UPDATE {ks}.follow_counts SET following = following + ? "
                            "WHERE user_id = ?",
            "count_follower": f"UPDATE {ks}.follow_counts SET followers = followers + ? "
                              "WHERE user_id = ?",
            "counts": f"SELECT followers, following FROM {ks}.follow_counts WHERE user_id = ?",
            "following_subset": f"SELECT author_id FROM {ks}.following_by_user "
                                "WHERE user_id = ? AND author_id IN ?",
            "followers_page": f"SELECT follower_id FROM {ks}.followers_by_author "
                              "WHERE author_id = ? AND shard = ? AND follower_id > ? LIMIT ?",
            "following_page": f"SELECT author_id FROM {ks}.following_by_user "
                              "WHERE user_id = ? AND author_id > ? LIMIT ?",
            "get_mode": f"SELECT mode FROM {ks}.author_modes WHERE author_id = ?",
            "set_mode": f"INSERT INTO {ks}.author_modes (author_id, mode) VALUES (?, ?)",
        }
        for name, cql in statements.items():
            prepared = self.session.prepare(cql)
            if name.startswith("author_events") or name in _UNPAGED:
                # Read whole: ORDER BY with IN on the partition key needs paging off (LIMIT
                # bounds it), and these results are used in full (``_wait`` reads one page).
                prepared.fetch_size = None
            if name in _SERIAL_READS:
                prepared.consistency_level = self._serial_consistency
            self._ps[name] = prepared

    async def _q(self, name: str, *params: Any, profile: Any = EXEC_PROFILE_DEFAULT
                 ) -> list[Any]:
        """Run a prepared statement; ``profile=TUPLES`` returns plain tuples (hot reads)."""
        try:
            return await self._execute(self._ps[name], params, profile)
        except RequestValidationException as exc:
            raise PermanentError(f"cassandra refused {name}: {exc}") from exc

    async def _ask_until_sure(self, name: str, *params: Any, read: bool = False
                              ) -> tuple[list[Any], bool]:
        """A lightweight transaction whose outcome may be unknown: the node timed out, a
        cluster answered "CAS operation result is unknown" (the proposal reached some
        replicas but not a quorum), or no answer came within the request timeout. It is
        asked again, the same statement with the same values (and, once unsure, after any
        retryable error), until answered, for up to ``TIMEOUT_TRIES`` sends and about one
        request timeout: Paxos either finishes the earlier proposal first (the retry is
        then refused and shows the row it wrote) or the earlier one never takes effect.
        A ``read`` (at serial consistency) is sent again after any retryable error.
        Returns the answer's rows and whether an earlier send was unsure."""
        deadline = time.monotonic() + self._request_timeout
        unsure = tries = 0
        while True:
            tries += 1
            try:
                return await self._q(name, *params), unsure > 0
            except (_WriteTimedOut, _ClientTimedOut):
                unsure += 1
                if tries >= TIMEOUT_TRIES or time.monotonic() >= deadline:
                    raise
            except RetryableError:
                if not (unsure or read) or tries >= TIMEOUT_TRIES or (
                        time.monotonic() >= deadline):
                    raise
            self.requests_resent += 1
            await asyncio.sleep(_resend_pause(tries))

    async def prepare(self, statements: dict[str, str]) -> dict[str, PreparedStatement]:
        """Prepare another port's statements on this session (``{ks}`` names the keyspace);
        for the ports that share it (``recipients_cassandra``)."""
        def prepare_all() -> dict[str, PreparedStatement]:
            return {name: self.session.prepare(cql.format(ks=self.keyspace))
                    for name, cql in statements.items()}

        try:
            return await asyncio.to_thread(prepare_all)
        except InvalidRequest as exc:
            raise ConfigError(f"keyspace {self.keyspace!r} is not migrated ({exc}): run "
                              "`feedsvc migrate`") from exc
        except _DRIVER_ERRORS as exc:
            raise RetryableError(f"cassandra: preparing statements failed: {exc}") from exc

    async def run(self, statement: PreparedStatement, *params: Any) -> list[Any]:
        """Run another port's prepared statement through this store's request limit and
        error map; rows are plain tuples."""
        try:
            return await self._execute(statement, params, TUPLES)
        except RequestValidationException as exc:
            raise PermanentError(f"cassandra refused a request: {exc}") from exc

    async def run_batch(self, items: Sequence[tuple[PreparedStatement, Sequence[Any]]]
                        ) -> None:
        """A few of another port's upserts (a delivery's log records, its provider ids) in
        one request per replica set that owns them (one request on a single node), each an
        unlogged batch, through the same error map as ``run``."""
        metadata = self.cluster.metadata
        several = len(metadata.all_hosts()) > 1
        groups: dict[tuple[str, ...], list[Any]] = {}
        for statement, params in items:
            bound = statement.bind(params)
            owners = replica_set(metadata, self.keyspace, bound.routing_key) if several else ()
            groups.setdefault(owners, []).append(bound)
        try:
            await asyncio.gather(*(self._execute(_unlogged(group), None, TUPLES)
                                   for group in groups.values()))
        except RequestValidationException as exc:
            raise PermanentError(f"cassandra refused a batch: {exc}") from exc

    async def _execute(self, statement: Any, params: Any = None,
                       profile: Any = EXEC_PROFILE_DEFAULT, *, bulk: bool = False
                       ) -> list[Any]:
        """One request; ``bulk`` ones (inbox batches) at most ``concurrency`` in flight, the
        others (a request's few reads and writes) never queued behind them, so an API that
        shares its process with workers (``feedsvc serve``) answers in its own time. Two
        refusals are sent again here rather than failing the caller (a fan-out task would
        otherwise redo all its rows): the sockets were full (nothing was sent), and, for a
        statement marked idempotent, a server write timeout (sent again with a new write
        time: like a redone task, a row an unmerge deleted meanwhile can come back; reads
        skip unfollowed authors anyway)."""
        busy = timeouts = 0
        while True:
            try:
                async with self._limit if bulk else contextlib.nullcontext():
                    return await _wait(self.session.execute_async(
                        statement, params, execution_profile=profile))
            except _SocketsFull:
                busy += 1
                if busy >= BUSY_RETRIES:
                    raise
                await asyncio.sleep(BUSY_PAUSE_S * busy)
            except _WriteTimedOut:
                timeouts += 1
                if not getattr(statement, "is_idempotent", False) or timeouts >= TIMEOUT_TRIES:
                    raise
                self.requests_resent += 1
                log.debug("a request timed out on the node; send %d of %d", timeouts + 1,
                          TIMEOUT_TRIES)
                await asyncio.sleep(_resend_pause(timeouts))

    async def ping(self) -> None:
        try:
            await _wait(self.session.execute_async("SELECT release_version FROM system.local"))
        except _DRIVER_ERRORS as exc:
            raise RetryableError(f"cassandra: {exc}") from exc

    async def close(self) -> None:
        await asyncio.to_thread(self.cluster.shutdown)

    # --- events ------------------------------------------------------------------------

    async def insert_event(self, event: Event, ttl_s: int) -> Event | None:
        body = _item_encoder.encode(event)
        rows, unsure = await self._ask_until_sure("insert_event", event.event_id, body,
                                              max(1, ttl_s))
        row = rows[0]
        # Refused after an unsure attempt, with this call's very bytes (its accepted_at to
        # the millisecond): that attempt stored it.
        if row.applied or (unsure and row.body == body):
            return None
        if row.body is None:  # the row is expiring this very second: let the client retry
            raise RetryableError(f"event {event.event_id} is expiring; retry")
        return _event_decoder.decode(row.body)

    async def get_event(self, event_id: str) -> Event | None:
        rows = await self._q("get_event", event_id)
        return _event_decoder.decode(rows[0].body) if rows else None

    # --- outbox (``Outbox``) -------------------------------------------------------------

    async def record(self, event_id: str, accepted_at: int, ttl_s: int) -> None:
        await self._q("outbox_record", outbox_bucket(accepted_at), event_id,
                      outbox_ttl(ttl_s))

    async def mark_queued(self, event_id: str, accepted_at: int, queued_at: int,
                          ttl_s: int) -> None:
        await self._q("outbox_queued", outbox_ttl(ttl_s), queued_at,
                      outbox_bucket(accepted_at), event_id)

    async def settle(self, event_id: str, accepted_at: int, ttl_s: int) -> None:
        await self._q("outbox_settle", outbox_ttl(ttl_s), outbox_bucket(accepted_at),
                      event_id)

    async def outbox_row(self, event_id: str, accepted_at: int) -> OutboxRow | None:
        rows = await self._q("outbox_row", outbox_bucket(accepted_at), event_id,
                             profile=TUPLES)
        return OutboxRow(rows[0][0], rows[0][1], bool(rows[0][2])) if rows else None

    async def outbox_bucket(self, bucket: int) -> list[OutboxRow]:
        rows = await self._q("outbox_bucket", bucket, profile=TUPLES)
        return [OutboxRow(event_id, queued_at, bool(done)) for event_id, queued_at, done in rows]

    async def sweep_checkpoint(self) -> int | None:
        rows = await self._q("get_checkpoint", _CHECKPOINT, profile=TUPLES)
        return int(rows[0][0]) if rows and rows[0][0] is not None else None

    async def set_sweep_checkpoint(self, bucket: int) -> None:
        await self._q("set_checkpoint", _CHECKPOINT, bucket)

    async def put_author_event(self, item: InboxItem, ttl_s: int) -> None:
        await self._q(
            "put_author_event", item.author_id, bucket_of(item.created_at), item.created_at,
            item.event_id, _item_encoder.encode(item), ttl_s,
        )

    async def author_events(
        self, author_id: str, before: Position | None, limit: int, since_ms: int
    ) -> list[InboxItem]:
        oldest = bucket_of(since_ms)
        # Without a cursor start at the newest bucket that can hold data (intake accepts a
        # little clock skew into the future).
        newest = bucket_of(now_ms() + MAX_FUTURE_MS)
        if before is not None:
            newest = min(newest, bucket_of(before.created_at))
        if newest < oldest:
            return []
        buckets = list(range(newest, oldest - 1, -1))
        # Most reads are served by the newest two days; only a sparse author needs the
        # second query over the rest of the retained buckets.
        items = await self._author_events(author_id, buckets[:2], before, limit, since_ms)
        if len(items) < limit and len(buckets) > 2:
            if items:
                before = Position(items[-1].created_at, items[-1].event_id)
            items += await self._author_events(author_id, buckets[2:], before,
                                               limit - len(items), since_ms)
        return items

    async def _author_events(self, author_id: str, buckets: list[int], before: Position | None,
                             limit: int, since_ms: int) -> list[InboxItem]:
        if before is None:
            rows = await self._q("author_events", author_id, buckets, since_ms, limit,
                                 profile=TUPLES)
        else:
            rows = await self._q(
                "author_events_before", author_id, buckets, before.created_at,
                before.event_id, since_ms, limit, profile=TUPLES,
            )
        return [_item_decoder.decode(r[0]) for r in rows]

    async def touch_pull_author(self, author_id: str, ttl_s: int) -> None:
        await self._q("touch_pull", _PULL_SHARD, author_id, now_ms(), ttl_s)

    async def pull_authors(self) -> dict[str, int]:
        rows = await self._q("pull_authors", _PULL_SHARD, profile=TUPLES)
        return {author: last for author, last in rows}

    # --- inboxes -----------------------------------------------------------------------

    async def write_inbox(self, user_ids: Sequence[str], item: InboxItem, ttl_s: int) -> None:
        """One row per user, sent as unlogged batches of rows that share their replicas (so
        the coordinator a batch is routed to owns every row in it), several in flight."""
        if not user_ids:
            return
        blob = _item_encoder.encode(item)
        per_batch = rows_per_batch(len(blob) + len(item.event_id) + len(item.author_id))
        # Serialize the values every row shares once; only the user id differs per row.
        shared = tuple(self._ps["write_inbox"].bind((
            user_ids[0], item.created_at, item.event_id, item.author_id, item.direct, blob,
            ttl_s)).values[1:])
        chunks = [group[start:start + per_batch]
                  for group in replica_groups(self.cluster.metadata, self.keyspace, user_ids)
                  for start in range(0, len(group), per_batch)]
        await asyncio.gather(*(self._send_rows(rows, shared) for rows in chunks))

    async def _send_rows(self, rows: Sequence[str], shared: tuple[bytes, ...]) -> None:
        batch = inbox_batch(self._ps["write_inbox"], rows, shared)
        try:
            await self._execute(batch, bulk=True)
        except InvalidRequest as exc:
            if "Batch too large" not in str(exc) or len(rows) == 1:
                raise PermanentError(f"cassandra refused an inbox write: {exc}") from exc
            half = len(rows) // 2
            await asyncio.gather(self._send_rows(rows[:half], shared),
                                 self._send_rows(rows[half:], shared))
        finally:
            # The driver keeps every finished request referenced until its timeout timer
            # expires (request_timeout, 30 s), and with it the batch's rows: a busy worker
            # would carry the last 30 s of rows, which Python's collector walks again and
            # again. Drop them now.
            batch.clear()

    async def read_inbox(
        self, user_id: str, before: Position | None, limit: int
    ) -> list[InboxItem]:
        if before is None:
            rows = await self._q("read_inbox", user_id, limit, profile=TUPLES)
        else:
            rows = await self._q(
                "read_inbox_before", user_id, before.created_at, before.event_id, limit,
                profile=TUPLES,
            )
        return [_item_decoder.decode(r[0]) for r in rows]

    async def delete_inbox_author(self, user_id: str, author_id: str) -> int:
        rows = await self._q("inbox_keys", user_id)
        doomed = [r for r in rows if r.author_id == author_id and not r.direct]
        await asyncio.gather(
            *(self._q("delete_inbox_row", user_id, r.created_at, r.event_id) for r in doomed)
        )
        return len(doomed)

    async def trim_inbox(self, user_id: str, keep: int) -> int:
        rows = await self._q("inbox_positions", user_id, keep + 1, profile=TUPLES)
        if len(rows) <= keep:
            return 0
        created_at, event_id = rows[keep - 1]
        await self._q("trim_inbox", user_id, created_at, event_id)
        return -1

    # --- follow graph ------------------------------------------------------------------

    async def follow(self, user_id: str, author_id: str) -> bool:
        return await self._follow(user_id, author_id, uuid.uuid4())

    async def _follow(self, user_id: str, author_id: str, op: uuid.UUID) -> bool:
        rows, _ = await self._ask_until_sure("follow", user_id, author_id, op)
        row = rows[0]
        # Refused, but the edge carries this call's op: an unsure earlier attempt wrote it.
        applied = bool(row.applied) or getattr(row, "op", None) == op
        # Always (re)write the reverse edge: a retry after a crash between the two writes
        # repairs it. Counts change only when the edge is new.
        await self._q("add_follower", author_id, follower_shard(user_id), user_id)
        if applied:
            await asyncio.gather(
                self._q("count_follow", 1, user_id), self._q("count_follower", 1, author_id)
            )
        return applied

    async def unfollow(self, user_id: str, author_id: str) -> bool:
        # A delete leaves nothing to recognise it by, so the edge is read first (at serial
        # consistency: it sees every transaction that finished). No edge: nothing to undo.
        # An edge, then a refusal after an unsure attempt: that attempt removed it (wrong
        # only if another unfollow of the same edge raced this one).
        applied = False
        edge, _ = await self._ask_until_sure("following_edge", user_id, author_id, read=True)
        if edge:
            rows, unsure = await self._ask_until_sure("unfollow", user_id, author_id)
            applied = bool(rows[0].applied) or unsure
        await self._q("remove_follower", author_id, follower_shard(user_id), user_id)
        if applied:
            await asyncio.gather(
                self._q("count_follow", -1, user_id), self._q("count_follower", -1, author_id)
            )
        return applied

    async def following_subset(self, user_id: str, author_ids: Sequence[str]) -> set[str]:
        ids = list(dict.fromkeys(author_ids))
        chunks = [ids[i:i + 100] for i in range(0, len(ids), 100)]
        results = await asyncio.gather(
            *(self._q("following_subset", user_id, chunk, profile=TUPLES) for chunk in chunks)
        )
        return {r[0] for rows in results for r in rows}

    async def followers_page(
        self, author_id: str, after: str | None, limit: int
    ) -> tuple[list[str], str | None]:
        shard, last = 0, ""
        if after:
            shard_text, _, last = after.partition(":")
            # isdigit() is true for '²' and other non-ASCII digits that int() refuses
            if not (shard_text.isascii() and shard_text.isdigit() and len(shard_text) <= 3):
                raise InvalidInput("cursor is not one this API returned",
                                   code="invalid_cursor", field="cursor")
            shard = int(shard_text)
        out: list[str] = []
        while shard < FOLLOWER_SHARDS and len(out) < limit:
            want = limit - len(out)
            rows = await self._q("followers_page", author_id, shard, last, want,
                                 profile=TUPLES)
            out.extend(r[0] for r in rows)
            if len(rows) == want:
                return out, f"{shard}:{out[-1]}"
            shard, last = shard + 1, ""
        return out, None

    async def follower_pages(self, author_id: str, page_size: int) -> AsyncIterator[list[str]]:
        """All shards are read at once, each paged on its own, and what they return is handed
        on in full pages (only the last may be short): a small author's followers arrive in
        one round trip and go out as one page, and no write batch is cut short at a shard's
        end (16 shards of 625 followers would otherwise make 16 pages, each ending in a
        partial batch)."""
        last = {shard: "" for shard in range(FOLLOWER_SHARDS)}
        pending: list[str] = []
        while last:
            shards = list(last)
            results = await asyncio.gather(*(
                self._q("followers_page", author_id, shard, last[shard], page_size,
                        profile=TUPLES) for shard in shards))
            for shard, rows in zip(shards, results, strict=True):
                if len(rows) < page_size:
                    del last[shard]
                else:
                    last[shard] = rows[-1][0]
                pending.extend(r[0] for r in rows)
            full = len(pending) - len(pending) % page_size
            for start in range(0, full, page_size):
                yield pending[start:start + page_size]
            del pending[:full]
        if pending:
            yield pending

    async def following_page(
        self, user_id: str, after: str | None, limit: int
    ) -> tuple[list[str], str | None]:
        rows = await self._q("following_page", user_id, after or "", limit + 1,
                             profile=TUPLES)
        ids = [r[0] for r in rows]
        more = len(ids) > limit
        ids = ids[:limit]
        return ids, (ids[-1] if more else None)

    async def counts(self, user_id: str) -> tuple[int, int]:
        rows = await self._q("counts", user_id)
        if not rows:
            return 0, 0
        return int(rows[0].followers or 0), int(rows[0].following or 0)

    async def get_mode(self, author_id: str) -> Mode:
        rows = await self._q("get_mode", author_id)
        return "pull" if rows and rows[0].mode == "pull" else "push"

    async def set_mode(self, author_id: str, mode: Mode) -> None:
        await self._q("set_mode", author_id, mode)
