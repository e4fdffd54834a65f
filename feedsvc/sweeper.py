"""The outbox sweeper: every accepted event is fanned out, whatever the queue lost.

Intake records each event in the outbox before storing it (``Outbox.record``), marks when
its fan-out task was queued, and the worker settles it when the fan-out is complete. An
event whose task never reached the queue (Redis down, the API killed between storing and
queueing) or whose entry Redis lost (a ``kill -9`` inside the AOF's ``everysec`` window, a
failover to a replica that had not received it) stays unsettled; the sweeper queues it
again. Fan-out is idempotent, so a task queued twice only costs time.

It runs inside every worker process (``workers.run_workers``), a pass every
``FEEDSVC_SWEEP_AFTER / 3``. A lease in the queue lets one process sweep at a time; two at
once would be safe, only wasteful. A pass reads the outbox a 10-second bucket at a time,
from the checkpoint (the oldest bucket that may still owe a fan-out) to the bucket of
``now - FEEDSVC_SWEEP_AFTER``: one partition read per bucket, plus one event read per
unsettled row. ``decide`` says what to do with each row:

- settled: nothing;
- no event behind it (the insert failed: the client got a 503) or a duplicate request's
  row (the event's own row is in the bucket of its first ``accepted_at``): settle it;
- queued less than ``FEEDSVC_SWEEP_AFTER`` ago: wait;
- the oldest entry still in its priority's stream was queued at or before this event's
  task (give or take the clocks' skew): its entry may still be there, pending under a slow
  worker or behind a backlog: wait;
- a low event older than ``FEEDSVC_LOW_MAX_AGE``: the queue would shed it; settle it;
- otherwise its entry is gone: queue it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Literal

import msgspec

from feedsvc import erasure
from feedsvc.errors import RetryableError
from feedsvc.model import PRIORITIES, Envelope, Event, FanoutTask, Priority
from feedsvc.runtime import Runtime
from feedsvc.store.base import OUTBOX_BUCKET_MS, OUTBOX_TTL_S, OutboxRow, outbox_bucket

log = logging.getLogger(__name__)

LEASE = "sweeper"
LOOKBACK_BUCKETS = 360  # a first sweep (no checkpoint yet) starts an hour back
BUCKETS_PER_PASS = 360  # a pass reads at most this many buckets, the next goes on from there
QUEUE_CLOCK_SKEW_MS = 5_000  # how far the queue's clock may be from the API's
# The checkpoint stays this far behind the grace period: an API whose clock runs behind the
# workers', or a request slowed between taking accepted_at and recording the row, still
# lands its row in a bucket the next passes read.
CHECKPOINT_MARGIN_MS = 60_000
CONSUMERS_GONE_S = 600.0  # consumers idle this long, holding nothing, leave the group
PRUNE_EVERY_S = 60.0
ERASURES_EVERY_S = 30.0  # how often stalled erasure jobs are looked for
EVENT_READS = 32  # event reads in flight per pass

Verdict = Literal["done", "settle", "wait", "shed", "requeue"]


class SweepStats(msgspec.Struct):
    buckets: int = 0
    rows: int = 0
    requeued: int = 0
    settled: int = 0
    waiting: int = 0
    shed: int = 0


def decide(row: OutboxRow, event: Event | None, bucket: int, now_ms: int, grace_ms: int,
           oldest_queued_ms: Mapping[Priority, int | None], low_max_age_ms: int) -> Verdict:
    """What the sweeper does with one outbox row (see the module docstring)."""
    if row.done:
        return "done"
    if event is None or outbox_bucket(event.accepted_at) != bucket:
        return "settle"
    last = max(event.accepted_at, row.queued_at or 0)
    if now_ms - last < grace_ms:
        return "wait"
    oldest = oldest_queued_ms.get(event.priority)
    if oldest is not None and oldest <= last + QUEUE_CLOCK_SKEW_MS:
        return "wait"
    if event.priority == "low" and now_ms - event.accepted_at > low_max_age_ms:
        return "shed"
    return "requeue"


class Sweeper:
    """One process's sweeper; ``run`` loops, ``sweep_once`` is one pass (tests call it)."""

    def __init__(self, rt: Runtime, holder: str) -> None:
        self.rt = rt
        self.holder = holder
        self._resume: int | None = None  # where a pass cut short by BUCKETS_PER_PASS goes on
        self._last_prune = 0.0
        self._last_erasures = 0.0

    async def run(self, stop: asyncio.Event) -> None:
        """Sweep every ``sweep_after / 3`` until ``stop``; a dependency outage is logged
        once and waited out, never the end of the loop."""
        interval = max(0.2, self.rt.settings.sweep_after / 3)
        failing = False
        while not stop.is_set():
            try:
                if await self.rt.queue.try_lease(LEASE, self.holder, interval * 3):
                    stats = await self.sweep_once()
                    if stats.requeued or stats.shed:
                        log.warning("outbox sweep: %d events queued again, %d shed",
                                    stats.requeued, stats.shed)
                    await self._prune()
                    await self._resume_erasures()
                if failing:
                    log.info("outbox sweeper resumed")
                failing = False
            except RetryableError as exc:
                if not failing:
                    log.warning("outbox sweeper waiting for a dependency: %s", exc)
                failing = True
            except Exception:
                log.exception("outbox sweep failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)

    async def _resume_erasures(self) -> None:
        """Every ``ERASURES_EVERY_S``: queue again the erasure jobs that stopped moving
        (``feedsvc/erasure.py``)."""
        loop = asyncio.get_running_loop()
        if loop.time() - self._last_erasures < ERASURES_EVERY_S:
            return
        self._last_erasures = loop.time()
        resumed = await erasure.resume_stalled(self.rt)
        if resumed:
            log.warning("%d erasure jobs had stopped; queued again", resumed)

    async def _prune(self) -> None:
        loop = asyncio.get_running_loop()
        if loop.time() - self._last_prune < PRUNE_EVERY_S:
            return
        self._last_prune = loop.time()
        idle = max(CONSUMERS_GONE_S, 20 * self.rt.settings.claim_idle)
        removed = await self.rt.queue.prune_consumers(idle)
        if removed:
            log.info("removed %d consumers idle for %.0f s with nothing pending", removed, idle)

    async def sweep_once(self, now_ms: int | None = None) -> SweepStats:
        rt = self.rt
        now = rt.now_ms() if now_ms is None else now_ms
        grace = int(rt.settings.sweep_after * 1000)
        newest = outbox_bucket(now - grace)  # may be partly within the grace period
        checkpoint = await rt.outbox.sweep_checkpoint()
        start = newest - LOOKBACK_BUCKETS + 1 if checkpoint is None else checkpoint
        first = start if self._resume is None or self._resume <= start else self._resume
        last = min(newest, first + BUCKETS_PER_PASS - 1)
        oldest = {p: await rt.queue.oldest_queued_ms(p) for p in PRIORITIES}
        stats = SweepStats()
        owed_from: int | None = None  # the first bucket still owing a fan-out
        for bucket in range(first, last + 1):
            stats.buckets += 1
            if await self._sweep_bucket(bucket, now, grace, oldest, stats) and owed_from is None:
                owed_from = bucket
        # The checkpoint moves past buckets that owe nothing and are wholly older than the
        # grace period; a pass cut short goes on from where it stopped next time.
        settled_until = min(last + 1, outbox_bucket(now - grace - CHECKPOINT_MARGIN_MS))
        if first == start:
            target = settled_until if owed_from is None else min(owed_from, settled_until)
            if target > start:
                await rt.outbox.set_sweep_checkpoint(target)
        self._resume = last + 1 if last < newest else None
        return stats

    async def _sweep_bucket(self, bucket: int, now: int, grace: int,
                            oldest: Mapping[Priority, int | None], stats: SweepStats) -> bool:
        """Sweep one bucket; True when it still owes a fan-out."""
        rt = self.rt
        rows = [r for r in await rt.outbox.outbox_bucket(bucket) if not r.done]
        stats.rows += len(rows)
        limit = asyncio.Semaphore(EVENT_READS)

        async def one(row: OutboxRow) -> bool:
            async with limit:
                event = await rt.store.get_event(row.event_id)
                verdict = decide(row, event, bucket, now, grace, oldest,
                                 int(rt.settings.low_max_age * 1000))
                if verdict in ("settle", "shed"):
                    ttl = (rt.ttl_left_s(event.created_at) if event is not None
                           else OUTBOX_TTL_S)  # as long as the row itself may live
                    await rt.outbox.settle(row.event_id, bucket * OUTBOX_BUCKET_MS, max(1, ttl))
                    stats.settled += verdict == "settle"
                    stats.shed += verdict == "shed"
                    if verdict == "shed":
                        log.info("event %s shed by the sweeper (low, older than "
                                 "FEEDSVC_LOW_MAX_AGE)", row.event_id)
                    return False
                if verdict == "wait":
                    stats.waiting += 1
                    return True
                assert event is not None and verdict == "requeue"
                await self._requeue(event)
                stats.requeued += 1
                return True

        # return_exceptions: every check has ended before this returns, also when the sweep
        # is cancelled (a plain gather hands the first cancelled check on at once and leaves
        # the others running, to meet a closed runtime; make test-cluster saw it).
        owed = await asyncio.gather(*(one(r) for r in rows), return_exceptions=True)
        for result in owed:
            if isinstance(result, BaseException):
                raise result
        return any(owed)

    async def _requeue(self, event: Event) -> None:
        rt = self.rt
        await rt.queue.enqueue(event.priority, Envelope(FanoutTask(event), rt.now_ms()))
        await rt.outbox.mark_queued(event.event_id, event.accepted_at, rt.now_ms(),
                                    max(1, rt.ttl_left_s(event.created_at)))
        log.info("event %s queued again by the outbox sweeper", event.event_id)
