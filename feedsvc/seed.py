"""``feedsvc seed``: a synthetic follow graph with power-law follower counts.

Author popularity follows a Zipf law (rank r is chosen with weight 1 / r**alpha), so a few
authors collect most follows and, on a large enough graph, cross the celebrity threshold,
while most have a handful of followers. Reproducible: the same ``--seed`` and sizes give
the same graph. Writes through the store (idempotent follows), with a progress bar.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator

from tqdm import tqdm

from feedsvc.config import Settings
from feedsvc.graph import add_edges, refresh_mode
from feedsvc.runtime import Runtime, open_runtime

_CHUNK = 2_000


def user_id(index: int) -> str:
    return f"u{index}"


def follow_pairs(users: int, follows_per_user: int, alpha: float,
                 seed: int) -> Iterator[tuple[str, str]]:
    """Yield (follower, author) pairs; each user follows up to ``2 * follows_per_user``
    distinct authors drawn by Zipf weight (never themselves)."""
    rng = random.Random(seed)
    weights = list(itertools.accumulate(1.0 / (rank ** alpha) for rank in range(1, users + 1)))
    population = range(users)
    for follower in population:
        want = min(users - 1, max(1, int(rng.expovariate(1.0 / follows_per_user))))
        want = min(want, 2 * follows_per_user)
        chosen: set[int] = set()
        while len(chosen) < want:
            (author,) = rng.choices(population, cum_weights=weights, k=1)
            if author != follower:
                chosen.add(author)
        for author in sorted(chosen):
            yield user_id(follower), user_id(author)


async def write_graph(rt: Runtime, pairs: Iterator[tuple[str, str]], total: int | None = None,
                      progress: bool = True) -> int:
    """Write follows through the store; returns how many edges were new."""
    authors: set[str] = set()
    new = 0
    with tqdm(total=total, unit="follow", disable=not progress) as bar:
        while chunk := list(itertools.islice(pairs, _CHUNK)):
            new += sum(await add_edges(rt, chunk))
            authors.update(a for _, a in chunk)
            bar.update(len(chunk))
    for author in authors:
        await refresh_mode(rt, author)
    return new


async def seed(settings: Settings, *, users: int, follows_per_user: int, alpha: float,
               seed: int) -> int:
    async with open_runtime(settings) as rt:
        pairs = follow_pairs(users, follows_per_user, alpha, seed)
        new = await write_graph(rt, pairs)
        print(f"seed: {users} users, {new} new follows")
        return new
