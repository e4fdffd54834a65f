"""A clock tests set and move by hand (``Runtime.clock``), in epoch milliseconds.

Queues compare scheduled entries with the wall clock when they claim, so a fake clock must
not run behind it: set it in the future, and hand ``clock()`` to ``queue.move_due`` to
make entries due by the fake clock claimable."""

from __future__ import annotations

import datetime as dt


class FakeClock:
    def __init__(self, at: dt.datetime) -> None:
        self.ms = int(at.timestamp() * 1000)

    def __call__(self) -> int:
        return self.ms

    def advance(self, seconds: float) -> None:
        self.ms += int(seconds * 1000)

    def set(self, at: dt.datetime) -> None:
        self.ms = int(at.timestamp() * 1000)
