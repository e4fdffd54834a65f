"""Delivery policy decisions: when, how often and through which channel (pure, no I/O).

Where it sits: the notify fan-out asks ``quiet_until`` before queueing a recipient's
channel work (inside their quiet hours a non-critical delivery is scheduled for the
window's end); the channel workers ask ``rate_window`` and ``over_limit`` before sending
(over the limit, a delivery is held for the window's digest), ``digest_text`` when the
window ends, and ``next_channel`` when a delivery cannot go out on its channel (fallback
and escalation). Everything here is a function of its arguments; the state (counters,
held lists, opened marks) is behind ``PolicyState`` in ``feedsvc/delivery/state.py``.
"""

from __future__ import annotations

import datetime as dt
import re
import zoneinfo
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated

import msgspec

from feedsvc.model import Channel
from feedsvc.ratelimit import Rate

_HHMM = re.compile(r"^([01][0-9]|2[0-3]):([0-5][0-9])$")

# FEEDSVC_NOTIFY_RATE's defaults: a phone buzzing more than 10 times an hour, or 3 texts
# or emails an hour, is what people turn notifications off over.
DEFAULT_NOTIFY_RATE: Mapping[str, Rate] = {
    "push": Rate(10, 3600.0), "sms": Rate(3, 3600.0), "email": Rate(3, 3600.0)}
DIGEST_TITLES = 3  # titles the built-in digest text lists
DIGEST_GRACE_MS = 1_000  # the digest runs this long after its window, for late holds


# --- quiet hours -----------------------------------------------------------------------------


class QuietHours(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """``preferences.quiet_hours``: no non-critical delivery from ``start`` to ``end``
    (HH:MM on the recipient's wall clock in ``timezone``, an IANA name)."""

    start: Annotated[str, msgspec.Meta(max_length=5, description="HH:MM")]
    end: Annotated[str, msgspec.Meta(max_length=5, description="HH:MM, may be before start "
                                                               "(the window crosses midnight)")]
    timezone: Annotated[str, msgspec.Meta(max_length=64, description="IANA zone name")]


class QuietHoursError(ValueError):
    """What is wrong with a quiet-hours setting; ``field`` names the part."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def clock_time(text: str, field: str) -> dt.time:
    match = _HHMM.fullmatch(text)
    if match is None:
        raise QuietHoursError(field, f"{field} must be a time of day as HH:MM (00:00-23:59)")
    return dt.time(int(match.group(1)), int(match.group(2)))


def zone(name: str, field: str = "quiet_hours.timezone") -> zoneinfo.ZoneInfo:
    """The IANA zone named ``name`` (``Europe/Paris``); a QuietHoursError otherwise."""
    try:
        if name and not name.startswith(("/", ".")) and ".." not in name:
            return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        pass
    raise QuietHoursError(field, f"{field} is not an IANA time zone name (Europe/Paris, ...)")


def check_quiet_hours(quiet: QuietHours) -> None:
    """Raise QuietHoursError naming the field (``quiet_hours.start``/``end``/``timezone``)."""
    start = clock_time(quiet.start, "quiet_hours.start")
    end = clock_time(quiet.end, "quiet_hours.end")
    zone(quiet.timezone)
    if start == end:
        raise QuietHoursError("quiet_hours.end", "quiet_hours.end must differ from start "
                                                 "(null turns quiet hours off)")


def quiet_until(quiet: QuietHours | None, now_ms: int) -> int | None:
    """When the quiet window that ``now_ms`` falls in ends (epoch ms), or None when it is
    outside the window (or there is none).

    The window is read on the recipient's wall clock: ``start`` inclusive, ``end``
    exclusive, crossing midnight when ``end`` <= ``start``. Its end is that wall-clock time
    converted through the zone database, so a night that loses or gains an hour to a
    daylight-saving change is an hour shorter or longer; an end that falls in the skipped
    hour of a spring-forward night is read with the offset before the change (02:30 that
    does not exist becomes 03:30 of the new offset)."""
    if quiet is None:
        return None
    try:
        tz = zone(quiet.timezone)
        start = clock_time(quiet.start, "quiet_hours.start")
        end = clock_time(quiet.end, "quiet_hours.end")
    except QuietHoursError:  # stored before a zone left the database: no window
        return None
    local = dt.datetime.fromtimestamp(now_ms / 1000, tz)
    wall = local.time().replace(tzinfo=None)
    if start < end:
        inside, end_day = start <= wall < end, local.date()
    else:  # crosses midnight
        inside = wall >= start or wall < end
        end_day = local.date() if wall < end else local.date() + dt.timedelta(days=1)
    if not inside:
        return None
    until = int(dt.datetime.combine(end_day, end, tzinfo=tz).timestamp() * 1000)
    return until if until > now_ms else None


# --- rate windows and digests ---------------------------------------------------------------


@dataclass(frozen=True)
class RateWindow:
    """One fixed window of a recipient's channel: ``[start_ms, end_ms)``."""

    start_ms: int
    end_ms: int

    def key(self, user_id: str, channel: Channel) -> str:
        """The counter's key (``/`` never appears in a user id)."""
        return f"{user_id}/{channel}/{self.start_ms}"

    def digest_event_id(self, channel: Channel) -> str:
        """The event id of this window's digest delivery (its key is that and the user)."""
        return f"digest:{channel}:{self.start_ms}"


def rate_window(rate: Rate, now_ms: int) -> RateWindow:
    """The window ``now_ms`` is in: windows of the rate's period, aligned to the epoch, so
    every worker computes the same one without talking to the others."""
    period = max(1, int(rate.period_s * 1000))
    start = now_ms - now_ms % period
    return RateWindow(start, start + period)


def over_limit(arrival: int, rate: Rate) -> bool:
    """Whether the ``arrival``-th delivery (1-based) of a window is held for the digest."""
    return arrival > rate.tokens


def parse_notify_rate(text: str) -> dict[str, Rate]:
    """``FEEDSVC_NOTIFY_RATE``: ``push=10/1h,sms=3/1h`` (channels left out keep their
    default), or one rate for every channel (``5/1h``)."""
    rates: dict[str, Rate] = dict(DEFAULT_NOTIFY_RATE)
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if len(parts) == 1 and "=" not in parts[0]:
        return dict.fromkeys(rates, Rate.parse(parts[0]))
    for part in parts:
        channel, sep, rate = part.partition("=")
        channel = channel.strip()
        if not sep or channel not in rates:
            raise ValueError(f"use channel=N/period pairs (push=10/1h,sms=3/1h), not {part!r}")
        rates[channel] = Rate.parse(rate)
    return rates


def digest_text(count: int, titles: Sequence[str]) -> tuple[str, str]:
    """The built-in digest's title and body: how many, then the first few titles."""
    title = f"{count} new notification{'s' if count != 1 else ''}"
    shown = [t for t in titles[:DIGEST_TITLES] if t]
    body = "; ".join(shown)
    if count > len(shown):
        body += f"{'; ' if shown else ''}and {count - len(shown)} more"
    return title, body


# --- fallback and escalation ---------------------------------------------------------------


def fallback_chain(fallback: Sequence[Channel], current: Channel) -> tuple[Channel, ...]:
    """The channels to try after ``current``, in order: those after it in ``fallback`` (all
    of them when it is not in the list), never ``current`` itself."""
    after = list(fallback)
    if current in after:
        after = after[after.index(current) + 1:]
    return tuple(dict.fromkeys(c for c in after if c != current))


def next_channel(chain: Sequence[Channel], allowed: Callable[[Channel], bool]
                 ) -> tuple[Channel, tuple[Channel, ...]] | None:
    """The first channel of ``chain`` the recipient allows, and what is left after it; None
    when there is none. (Whether they can be reached there is found out by sending: a
    channel with no device or contact moves on along the rest of the chain.)"""
    for index, channel in enumerate(chain):
        if allowed(channel):
            return channel, tuple(chain[index + 1:])
    return None


def may_fall_back(critical: bool, priority: str, fallback: Sequence[Channel]) -> bool:
    """Only urgent notifications change channel: critical or high priority, with a list."""
    return bool(fallback) and (critical or priority == "high")
