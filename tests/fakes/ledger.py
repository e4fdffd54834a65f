"""What every fake provider shares: how it misbehaves, and what it accepted.

``Behaviour`` is mutable so a test can change it between sends. ``Ledger`` counts accepted
deliveries per ``Idempotency-Key``: a repeat of an accepted key is answered as a success
(the provider de-duplicates) but not counted as a second delivery; the raw number of such
repeats is kept in ``repeats``. Thread-safe, because the SMTP fake runs on its own thread.
"""

from __future__ import annotations

import asyncio
import random
import socket
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

Outcome = Literal["missing_key", "duplicate", "scripted", "hang", "error", "dead", "accept"]


@dataclass
class Behaviour:
    error_rate: float = 0.0  # share of requests answered with one of error_statuses
    error_statuses: tuple[int, ...] = (503, 429)
    timeout_rate: float = 0.0  # share of requests that hang for `hang` seconds
    hang: float = 30.0
    latency: float = 0.0  # seconds before every answer
    retry_after: int | None = None  # Retry-After on 429/503 answers
    dead: set[str] = field(default_factory=set)  # targets that can never receive
    script: list[int] = field(default_factory=list)  # the next answers' statuses, in order
    seed: int | None = None

    def __post_init__(self) -> None:
        self.random = random.Random(self.seed)


@dataclass
class Decision:
    outcome: Outcome
    status: int = 200
    message_id: str = ""


class Ledger:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.accepted: dict[str, dict[str, Any]] = {}  # key -> what the fake received
        self.message_ids: dict[str, str] = {}
        self.repeats: Counter[str] = Counter()  # raw repeats of already-accepted keys
        self.requests = 0
        self.missing_key = 0
        self.failures: Counter[int] = Counter()  # injected or refused answers by status
        self._next_id = 0

    def decide(self, behaviour: Behaviour, key: str | None, target: str,
               *, count: bool = True) -> Decision:
        """What to answer, in this order: no key (400), a repeat of an accepted key (the
        first answer again), a scripted status, a hang, a random error, a dead target,
        acceptance. Does not record the acceptance: call ``accept``."""
        with self._lock:
            self.requests += 1
            if not key:
                self.missing_key += 1
                return Decision("missing_key", 400)
            if key in self.accepted:
                self.repeats[key] += 1
                return Decision("duplicate", 200, self.message_ids[key])
            if behaviour.script:
                status = behaviour.script.pop(0)
                self.failures[status] += 1
                return Decision("scripted", status)
            roll = behaviour.random.random()
            if roll < behaviour.timeout_rate:
                return Decision("hang", 503)
            if roll < behaviour.timeout_rate + behaviour.error_rate:
                status = behaviour.random.choice(behaviour.error_statuses)
                self.failures[status] += 1
                return Decision("error", status)
            if target in behaviour.dead:
                return Decision("dead", 404)
            return Decision("accept", 200)

    def accept(self, key: str, record: dict[str, Any], prefix: str = "msg") -> str:
        with self._lock:
            if key in self.accepted:  # raced with a concurrent repeat: still one delivery
                self.repeats[key] += 1
                return self.message_ids[key]
            self._next_id += 1
            message_id = f"{prefix}-{self._next_id}"
            self.accepted[key] = record
            self.message_ids[key] = message_id
            return message_id

    @property
    def repeat_count(self) -> int:
        return sum(self.repeats.values())

    def stats(self, *, keys: bool = False) -> dict[str, Any]:
        """Counts (and with ``keys`` the accepted keys and repeats) as plain JSON data."""
        with self._lock:
            out: dict[str, Any] = {
                "requests": self.requests, "accepted": len(self.accepted),
                "repeats": sum(self.repeats.values()), "missing_key": self.missing_key,
                "failures": {str(k): v for k, v in self.failures.items()},
            }
            if keys:
                out["accepted_keys"] = list(self.accepted)
                out["repeated_keys"] = dict(self.repeats)
            return out


async def pause(behaviour: Behaviour, decision: Decision) -> None:
    """The configured latency, or the whole hang for a request chosen to time out."""
    delay = behaviour.hang if decision.outcome == "hang" else behaviour.latency
    if delay > 0:
        await asyncio.sleep(delay)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def retry_headers(behaviour: Behaviour, status: int) -> dict[str, str]:
    if behaviour.retry_after is not None and status in (429, 503):
        return {"Retry-After": str(behaviour.retry_after)}
    return {}
