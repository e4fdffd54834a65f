"""Circuit breakers: one per provider, so a provider that is down is not called per delivery.

Where it sits: the channel workers (``feedsvc/delivery/send.py``) ask the provider's
breaker ``allow(now)`` before a call and tell it ``record(ok, now)`` after; while it is open
a delivery fails fast (it falls back to another channel or waits for the cooldown). The
state machine is pure: time is always passed in (seconds, any clock), so tests drive it
with a fake clock.

- **closed**: calls go through. It opens after ``failures`` consecutive failures, or when
  at least ``MIN_CALLS`` calls of the last ``window_s`` seconds failed in a share of at
  least ``ratio``.
- **open**: no call goes through until ``cooldown_s`` has passed since it opened.
- **half-open**: one probe call at a time goes through; its success closes the breaker
  (with a fresh window), its failure opens it again for another cooldown.

Breakers live in each process (``Breakers`` on the runtime): every worker process learns
for itself that a provider is down, within its first few failures.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Literal

import msgspec

log = logging.getLogger(__name__)

BreakerState = Literal["closed", "open", "half_open"]
MIN_CALLS = 10  # the failure ratio counts only once the window holds this many calls


@dataclass(frozen=True)
class BreakerConfig:
    failures: int = 5  # consecutive failures that open the breaker
    ratio: float = 0.5  # or this share of failed calls over the window ...
    window_s: float = 60.0  # ... of this many seconds
    cooldown_s: float = 30.0  # open this long before a probe


class BreakerStatistics(msgspec.Struct, frozen=True):
    """A breaker as the status of the service shows it."""

    name: str
    state: BreakerState
    consecutive_failures: int
    calls_in_window: int
    failures_in_window: int
    opened_at: float | None  # by the breaker's clock (seconds)
    retry_at: float | None  # when a probe may go (open), by the same clock
    transitions: int  # state changes since the process started
    rejected: int  # calls failed fast while open


class CircuitBreaker:
    """The state machine of one provider; see the module docstring."""

    def __init__(self, name: str, config: BreakerConfig) -> None:
        self.name, self.config = name, config
        self.state: BreakerState = "closed"
        self.consecutive = 0
        self.calls: deque[tuple[float, bool]] = deque()  # (when, ok) within the window
        self.failed = 0  # failures among ``calls``, kept as calls come and go (O(1) a call)
        self.opened_at: float | None = None
        self.probing = False
        self.transitions = 0
        self.rejected = 0

    def _to(self, state: BreakerState, now: float) -> None:
        if state != self.state:
            log.warning("provider %s breaker: %s -> %s", self.name, self.state, state)
            self.state = state
            self.transitions += 1
        if state == "open":
            self.opened_at = now
        elif state == "closed":
            self.opened_at = None
            self.calls.clear()
            self.failed = 0
            self.consecutive = 0
        self.probing = False

    def retry_at(self) -> float | None:
        """When the open breaker lets a probe through (None unless open)."""
        if self.state != "open" or self.opened_at is None:
            return None
        return self.opened_at + self.config.cooldown_s

    def allow(self, now: float) -> bool:
        """Whether a call may go now; a True in half-open is the probe (the caller must
        ``record`` its outcome)."""
        if self.state == "open":
            retry = self.retry_at()
            if retry is not None and now >= retry:
                self._to("half_open", now)
            else:
                self.rejected += 1
                return False
        if self.state == "half_open":
            if self.probing:
                self.rejected += 1
                return False
            self.probing = True
        return True

    def record(self, ok: bool, now: float) -> None:
        """The outcome of an allowed call."""
        if self.state == "half_open":
            self._to("closed" if ok else "open", now)
            return
        if self.state == "open":  # a call allowed before it opened, answered late
            return
        self.calls.append((now, ok))
        self.failed += not ok
        while self.calls and self.calls[0][0] <= now - self.config.window_s:
            self.failed -= not self.calls.popleft()[1]
        self.consecutive = 0 if ok else self.consecutive + 1
        if self.consecutive >= self.config.failures or (
                len(self.calls) >= MIN_CALLS
                and self.failed / len(self.calls) >= self.config.ratio):
            self._to("open", now)

    def abandon(self) -> None:
        """An allowed call that ended with no answer either way (cancelled): a half-open
        breaker lets the next probe through."""
        self.probing = False

    def statistics(self) -> BreakerStatistics:
        return BreakerStatistics(self.name, self.state, self.consecutive, len(self.calls),
                                 self.failed, self.opened_at, self.retry_at(), self.transitions,
                                 self.rejected)


class Breakers:
    """This process's breakers by provider name, made on first use."""

    def __init__(self, config: BreakerConfig | None = None) -> None:
        self.config = config or BreakerConfig()
        self.by_name: dict[str, CircuitBreaker] = {}

    def get(self, name: str) -> CircuitBreaker:
        breaker = self.by_name.get(name)
        if breaker is None:
            breaker = self.by_name[name] = CircuitBreaker(name, self.config)
        return breaker

    def statistics(self) -> dict[str, BreakerStatistics]:
        """Every provider's breaker (for the status of the service)."""
        return {name: b.statistics() for name, b in sorted(self.by_name.items())}
