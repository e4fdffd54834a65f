"""Worker run loops: claim a task (high before medium before low), run it, acknowledge.

At-least-once: an entry is acknowledged only after its writes. A worker killed mid-task
leaves its entry pending; another consumer reclaims it after ``FEEDSVC_CLAIM_IDLE`` and
redoes it (every write is an upsert).

A dependency outage is not a failed task. A task that raises ``RetryableError`` (Cassandra
or Redis unavailable, a request that timed out) is retried here with capped, jittered
backoff for as long as that lasts; its entry stays pending meanwhile and the consumer
takes nothing else, so an outage neither loses work nor hot-loops. Only a task retrying
cannot fix (a bug, invalid data: any other exception) goes to the dead-letter stream, with
reason ``poison``. An error anywhere in a consumer's loop (claim, acknowledge, dead-letter)
is logged in one line and waited out; it never ends the consumer or the process. Each
worker process also runs the outbox sweeper (``feedsvc/sweeper.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from feedsvc import erasure, fanout, logs, metrics
from feedsvc.delivery import digest, escalation, notify, send
from feedsvc.delivery.providers.registry import Providers
from feedsvc.errors import RetryableError
from feedsvc.model import (
    ChannelTask,
    DigestTask,
    Envelope,
    EraseTask,
    EscalateTask,
    FanoutTask,
    NotifyTask,
)
from feedsvc.queue.base import FANOUT, QUEUES, Delivery, QueueName
from feedsvc.runtime import Runtime
from feedsvc.sweeper import Sweeper

log = logging.getLogger(__name__)

BACKOFF_BASE = 0.2
BACKOFF_CAP = 5.0  # so work resumes within seconds of a dependency answering again
LOG_EVERY = 10  # a task retrying for long logs its 1st, 10th, 20th, ... failure
NO_PROVIDERS = Providers({})  # every delivery suppressed: channel_not_configured


def backoff(attempt: int, rng: random.Random | None = None) -> float:
    """Full-jitter exponential backoff for retry ``attempt`` (1-based), capped."""
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempt - 1))
    return (rng or random).uniform(0, ceiling)


def consumer_name(index: int = 0) -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{index}"


async def _pause(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds`` unless ``stop`` is set first; True when stopping."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    return stop.is_set()


async def until_done(what: str, step: Callable[[], Awaitable[None]], stop: asyncio.Event,
                     beat: Callable[[], None] = lambda: None) -> bool:
    """Run an idempotent ``step`` until it succeeds, backing off while it raises
    ``RetryableError``; False when ``stop`` was set first (the step did not happen)."""
    attempt = 0
    while True:
        try:
            await step()
            return True
        except RetryableError as exc:
            attempt += 1
            if attempt == 1 or attempt % LOG_EVERY == 0:
                log.warning("%s failed (%s); retrying (attempt %d)", what, exc, attempt)
        beat()
        if await _pause(stop, backoff(attempt)):
            return False


async def handle(rt: Runtime, envelope: Envelope, providers: Providers,
                 holder: str) -> None:
    """One task, by kind: a channel delivery (unless held for its window's digest), a
    window's digest, an escalation check, a page of a notify fan-out, or fan-out work."""
    task = envelope.task
    if isinstance(task, ChannelTask):
        erased = await rt.erased.get(rt)
        if task.user_id in erased or task.event.author_id in erased:
            return  # erased meanwhile: nothing is sent to them, or of theirs (erasure.py)
        if not await digest.hold_over_limit(rt, task):
            await send.deliver(rt, task, providers, holder)
    elif isinstance(task, DigestTask):
        if task.user_id not in await rt.erased.get(rt):
            await digest.send_digest(rt, task, providers, holder)
    elif isinstance(task, EscalateTask):
        await escalation.escalate(rt, task)  # its channel task is checked like any other
    elif isinstance(task, EraseTask):
        await erasure.erase_step(rt, task)
    elif (isinstance(task, FanoutTask | NotifyTask)
          and task.event.author_id in await rt.erased.get(rt)):
        event = task.event  # erased meanwhile: nothing of theirs is written or sent
        await rt.outbox.settle(event.event_id, event.accepted_at,
                               max(1, rt.ttl_left_s(event.created_at)))
    elif isinstance(task, NotifyTask):
        await notify.notify_page(rt, task)
    else:
        await fanout.handle(rt, envelope)


def task_ids(delivery: Delivery) -> dict[str, str | None]:
    """The ids a task's log lines carry (``feedsvc.logs``)."""
    task = delivery.envelope.task
    event = getattr(task, "event", None)
    return {"entry_id": delivery.entry_id,
            "event_id": event.event_id if event is not None else None,
            "user_id": task.user_id if isinstance(task, ChannelTask | EraseTask) else None}


async def process(rt: Runtime, delivery: Delivery, stop: asyncio.Event | None = None,
                  beat: Callable[[], None] = lambda: None,
                  providers: Providers | None = None, holder: str = "") -> None:
    """Run one entry to completion: acknowledged, or dead-lettered with a reason. When
    ``stop`` is set first the entry is left pending, for another consumer to take over.
    Every line logged meanwhile names the entry and its event."""
    with logs.bound(**task_ids(delivery)):
        await _process(rt, delivery, stop, beat, providers, holder)


async def _process(rt: Runtime, delivery: Delivery, stop: asyncio.Event | None,
                   beat: Callable[[], None], providers: Providers | None,
                   holder: str) -> None:
    stop = stop or asyncio.Event()
    what = f"task {delivery.entry_id}"
    chosen = providers or NO_PROVIDERS
    holder = holder or consumer_name()
    try:
        async with _keep_claimed(rt, delivery, holder):
            if not await until_done(what, lambda: handle(rt, delivery.envelope, chosen,
                                                         holder), stop, beat):
                return
    except Exception as exc:  # a bug or bad data: retrying cannot help
        log.exception("%s failed permanently; dead-lettered", what)
        detail = repr(exc)
        if await until_done(f"dead-lettering {what}",
                            lambda: _dead_letter(rt, delivery, detail), stop, beat):
            metrics.task_finished(delivery.queue, "dead_letter")
        return
    if await until_done(f"acknowledging {what}", lambda: rt.queue.ack(delivery), stop, beat):
        metrics.task_finished(delivery.queue, "done")


@contextlib.asynccontextmanager
async def _keep_claimed(rt: Runtime, delivery: Delivery, consumer: str) -> AsyncIterator[None]:
    """While a task runs (a long fan-out, a retry through an outage), tell the queue every
    third of ``FEEDSVC_CLAIM_IDLE`` that it is still being worked on, so no other consumer
    takes it over and does it a second time.

    The toucher ends on ``finished``, not on cancellation alone: redis-py can swallow a
    cancellation that lands while it reconnects, and a toucher that kept looping after
    that held its consumer (and a clean shutdown) forever."""
    finished = asyncio.Event()

    async def touch() -> None:
        while not await _pause(finished, rt.settings.claim_idle / 3):
            with contextlib.suppress(RetryableError):
                await rt.queue.touch(delivery, consumer)

    toucher = asyncio.create_task(touch())
    try:
        yield
    finally:
        finished.set()
        toucher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await toucher


async def _dead_letter(rt: Runtime, delivery: Delivery, detail: str) -> None:
    task = delivery.envelope.task
    if isinstance(task, FanoutTask | NotifyTask):
        # Settled: the sweeper leaves it to the dead letters (``feedsvc dlq replay``).
        event = task.event
        await rt.outbox.settle(event.event_id, event.accepted_at,
                               max(1, rt.ttl_left_s(event.created_at)))
    await rt.queue.dead_letter(delivery, "poison", detail)


async def run_consumer(rt: Runtime, name: str, stop: asyncio.Event, *,
                       burst: bool = False, block_s: float = 1.0,
                       queues: Sequence[QueueName] = QUEUES,
                       providers: Providers | None = None) -> int:
    """Claim and process until ``stop`` is set (or, in burst mode, the queue is empty).
    Returns how many entries were processed. Nothing but cancellation ends it early."""
    done = 0
    failures = 0

    def beat() -> None:
        rt.health.beat(name)

    while not stop.is_set():
        beat()
        try:
            delivery = await rt.queue.claim(name, 0.05 if burst else block_s, queues)
            if delivery is None:
                if burst:
                    return done
            else:
                await process(rt, delivery, stop, beat, providers, name)
                done += 1
            if failures:
                log.info("consumer %s: queue available again", name)
            failures = 0
            continue
        except RetryableError as exc:
            if failures == 0:
                log.warning("consumer %s: queue unavailable: %s", name, exc)
        except Exception:
            log.exception("consumer %s: unexpected error; carrying on", name)
        failures += 1
        await _pause(stop, backoff(failures))
    return done


async def run_workers(rt: Runtime, concurrency: int, stop: asyncio.Event, *,
                      burst: bool = False, queues: Sequence[QueueName] = QUEUES,
                      providers: Providers | None = None, senders: int = 0) -> int:
    """Run ``concurrency`` consumers in this process (and, unless in burst mode, the
    outbox sweeper) until ``stop`` (or drained, in burst).

    ``senders`` more consumers serve only the channel queues among ``queues``: a delivery
    spends most of its time waiting for a provider's answer, so sends need many more in
    flight than fan-out pages do (4 consumers reached 0.15 of the fake FCM's ceiling, 16
    reached 0.28, on a loaded two-core machine).

    Cancelled (SIGTERM), or when one consumer fails, it sets ``stop``, cancels the others
    and returns only once every task has ended, so the runtime is never closed under a
    consumer still at work (a plain ``gather`` hands the first cancellation on at once and
    leaves the rest running; they then met closed connections, logged them as outages and
    went into retry back-off until the event loop closed). ``stop`` covers a consumer whose
    cancellation a library swallowed: it leaves at its next claim."""
    channels = [q for q in queues if q not in FANOUT]
    senders = senders if channels else 0
    rt.health.expected += concurrency + senders
    consumers = [asyncio.ensure_future(run_consumer(rt, consumer_name(i), stop, burst=burst,
                                                    queues=queues, providers=providers))
                 for i in range(concurrency)]
    consumers += [asyncio.ensure_future(run_consumer(
        rt, consumer_name(concurrency + i), stop, burst=burst, queues=channels,
        providers=providers)) for i in range(senders)]
    helpers = [] if burst else [
        asyncio.ensure_future(Sweeper(rt, consumer_name()).run(stop))]
    try:
        return sum(await asyncio.gather(*consumers))
    except BaseException:
        stop.set()
        for task in consumers + helpers:
            task.cancel()
        await asyncio.gather(*consumers, *helpers, return_exceptions=True)
        raise
    finally:
        stop.set()
        await asyncio.gather(*helpers, return_exceptions=True)
        rt.health.expected -= concurrency + senders


async def drain(rt: Runtime, concurrency: int = 4, providers: Providers | None = None,
                queues: Sequence[QueueName] = QUEUES) -> int:
    """Process everything queued now and return (burst mode, for tests and the CLI)."""
    return await run_workers(rt, concurrency, asyncio.Event(), burst=True, queues=queues,
                             providers=providers)
