"""Worker run loops: claim a task (high before medium before low), run it, acknowledge.

At-least-once: an entry is acknowledged only after its writes. A task that raises a
``RetryableError`` is retried here with exponential backoff and jitter; when the retries
are exhausted, or the error is permanent, the entry goes to the dead-letter stream with
the reason. A worker killed mid-task leaves its entry pending; another consumer reclaims
it after ``FEEDSVC_CLAIM_IDLE`` and redoes it (every write is an upsert).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket

from feedsvc import fanout
from feedsvc.errors import RetryableError
from feedsvc.queue.base import Delivery
from feedsvc.runtime import Runtime

log = logging.getLogger(__name__)

RETRIES = 5
BACKOFF_BASE = 0.2
BACKOFF_CAP = 10.0


def backoff(attempt: int, rng: random.Random | None = None) -> float:
    """Full-jitter exponential backoff for retry ``attempt`` (1-based), capped."""
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempt - 1))
    return (rng or random).uniform(0, ceiling)


def consumer_name(index: int = 0) -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{index}"


async def process(rt: Runtime, delivery: Delivery) -> None:
    """Run one delivery to completion: acknowledged, or dead-lettered with a reason."""
    for attempt in range(1, RETRIES + 1):
        try:
            await fanout.handle(rt, delivery.envelope)
        except RetryableError as exc:
            if attempt == RETRIES:
                await rt.queue.dead_letter(delivery, "error", str(exc))
                return
            log.warning("task %s failed (%s); retry %d", delivery.entry_id, exc, attempt)
            await asyncio.sleep(backoff(attempt))
        except Exception as exc:  # a bug or bad data: retrying cannot help
            log.exception("task %s failed permanently", delivery.entry_id)
            await rt.queue.dead_letter(delivery, "poison", repr(exc))
            return
        else:
            await rt.queue.ack(delivery)
            return


async def run_consumer(rt: Runtime, name: str, stop: asyncio.Event, *,
                       burst: bool = False, block_s: float = 1.0) -> int:
    """Claim and process until ``stop`` is set (or, in burst mode, the queue is empty).
    Returns how many entries were processed."""
    done = 0
    while not stop.is_set():
        try:
            delivery = await rt.queue.claim(name, 0.05 if burst else block_s)
        except RetryableError as exc:
            log.warning("queue unavailable: %s", exc)
            await asyncio.sleep(1.0)
            continue
        if delivery is None:
            if burst:
                return done
            continue
        await process(rt, delivery)
        done += 1
    return done


async def run_workers(rt: Runtime, concurrency: int, stop: asyncio.Event, *,
                      burst: bool = False) -> int:
    """Run ``concurrency`` consumers in this process until ``stop`` (or drained, in burst).

    Cancelled (SIGTERM), or when one consumer fails, it sets ``stop``, cancels the others
    and returns only once every consumer has ended, so the runtime is never closed under a
    consumer still at work (a plain ``gather`` hands the first cancellation on at once and
    leaves the rest running; they then met closed connections, logged them as outages and
    went into retry back-off until the event loop closed). ``stop`` covers a consumer whose
    cancellation a library swallowed: it leaves at its next claim."""
    consumers = [asyncio.ensure_future(run_consumer(rt, consumer_name(i), stop, burst=burst))
                 for i in range(concurrency)]
    try:
        return sum(await asyncio.gather(*consumers))
    except BaseException:
        stop.set()
        for consumer in consumers:
            consumer.cancel()
        await asyncio.gather(*consumers, return_exceptions=True)
        raise


async def drain(rt: Runtime, concurrency: int = 4) -> int:
    """Process everything queued now and return (burst mode, for tests and the CLI)."""
    return await run_workers(rt, concurrency, asyncio.Event(), burst=True)
