"""Follow graph: follow/unfollow, reach counts, the author's routing mode.

Called by the API (``PUT/DELETE /v1/users/{u}/following/{a}``, ``POST /v1/follows/bulk``).
A follow change is in effect when these return: the edge and counts are written, the
user's cached following lists are stale in every API process (``Notices``) and the author's
mode is re-evaluated. Proportional work goes to the queue: a backfill of a push
author's recent events for a new follower, and removal of an unfollowed author's rows.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from feedsvc.errors import RetryableError, Unprocessable
from feedsvc.model import BackfillTask, Envelope, Mode, Priority, UnmergeTask
from feedsvc.runtime import Runtime

log = logging.getLogger(__name__)

DEMOTE_RATIO = 0.9  # a pull author returns to push only below 90% of the threshold
_BULK_CONCURRENCY = 64
_TASK_PAIRS = 1_000


def next_mode(current: Mode, followers: int, threshold: int) -> Mode:
    """Hysteresis: promote at ``threshold`` followers, demote below 90% of it."""
    if current == "push":
        return "pull" if followers >= threshold else "push"
    return "push" if followers < threshold * DEMOTE_RATIO else "pull"


async def refresh_mode(rt: Runtime, author_id: str) -> Mode:
    """Re-evaluate and persist the author's mode from its current follower count."""
    (followers, _), current = await asyncio.gather(
        rt.store.counts(author_id), rt.store.get_mode(author_id)
    )
    mode = next_mode(current, followers, rt.settings.celebrity_threshold)
    if mode != current:
        await rt.store.set_mode(author_id, mode)
        if mode == "pull":
            # New followers get no backfill from here on: readers must pull this author's
            # retained events at once, before its first pull-routed event.
            await rt.store.touch_pull_author(author_id, rt.settings.retention_ms // 1000)
        try:  # readers' cached pull sets are stale now
            await rt.notices.pull_set_changed()
        except RetryableError as exc:  # intake must not fail on it: the TTL bounds it
            log.warning("author %s changed mode; readers see it within "
                        "FEEDSVC_PULL_SET_TTL: %s", author_id, exc)
    return mode


def _check_pair(user_id: str, author_id: str) -> None:
    if user_id == author_id:
        raise Unprocessable("a user cannot follow themselves", code="self_follow",
                            field="author_id")


async def _enqueue_pairs(rt: Runtime, task: type[BackfillTask | UnmergeTask],
                         pairs: Sequence[tuple[str, str]]) -> None:
    for start in range(0, len(pairs), _TASK_PAIRS):
        chunk = list(pairs[start:start + _TASK_PAIRS])
        priority: Priority = "high" if task is BackfillTask else "medium"
        await rt.queue.enqueue(priority, Envelope(task(chunk), rt.now_ms()))


async def follow(rt: Runtime, user_id: str, author_id: str) -> bool:
    _check_pair(user_id, author_id)
    await rt.erased.refuse(rt, user_id, author_id)
    changed = await rt.store.follow(user_id, author_id)
    # Even when unchanged: a retry after a failed notice must still make it.
    await rt.notices.following_changed([user_id])
    mode = await refresh_mode(rt, author_id)
    if changed and mode == "push":
        await _enqueue_pairs(rt, BackfillTask, [(user_id, author_id)])
    return changed


async def unfollow(rt: Runtime, user_id: str, author_id: str) -> bool:
    if user_id == author_id:
        return False  # never followed: unfollowing is idempotent, so this is done already
    changed = await rt.store.unfollow(user_id, author_id)
    # Before the answer: the user's next read, on any process, no longer shows the author.
    await rt.notices.following_changed([user_id])
    await refresh_mode(rt, author_id)
    if changed:
        await _enqueue_pairs(rt, UnmergeTask, [(user_id, author_id)])
    return changed


async def add_edges(rt: Runtime, pairs: Sequence[tuple[str, str]]) -> list[bool]:
    """Write follow edges, many at once (bounded); True for each edge that was new. Modes
    are not re-evaluated here: callers do it once per author."""
    limit = asyncio.Semaphore(_BULK_CONCURRENCY)

    async def one(pair: tuple[str, str]) -> bool:
        async with limit:
            return await rt.store.follow(*pair)

    return list(await asyncio.gather(*(one(p) for p in pairs)))


async def follow_many(rt: Runtime, pairs: Sequence[tuple[str, str]]) -> int:
    """Apply many follows; returns how many edges were new."""
    for user_id, author_id in pairs:
        _check_pair(user_id, author_id)
    erased = await rt.erased.get(rt)
    for i, (user_id, author_id) in enumerate(pairs):
        if user_id in erased or author_id in erased:
            raise Unprocessable("a follow names an erased user", code="user_erased",
                                field=f"follows[{i}]")
    changed = await add_edges(rt, pairs)
    await rt.notices.following_changed([user_id for user_id, _ in pairs])
    modes: dict[str, Mode] = {}
    for author_id in dict.fromkeys(a for _, a in pairs):
        modes[author_id] = await refresh_mode(rt, author_id)
    new = [p for p, c in zip(pairs, changed, strict=True) if c]
    await _enqueue_pairs(rt, BackfillTask, [p for p in new if modes[p[1]] == "push"])
    return len(new)
