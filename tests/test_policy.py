"""Delivery policy decisions and the circuit breaker, without I/O: quiet hours (midnight,
daylight-saving changes), rate windows and digests, fallback chains, breaker states."""

from __future__ import annotations

import datetime as dt

import pytest

from feedsvc.config import Settings
from feedsvc.delivery.breaker import BreakerConfig, Breakers, CircuitBreaker
from feedsvc.delivery.policy import (
    QuietHours,
    QuietHoursError,
    check_quiet_hours,
    digest_text,
    fallback_chain,
    may_fall_back,
    next_channel,
    over_limit,
    parse_notify_rate,
    quiet_until,
    rate_window,
)
from feedsvc.errors import ConfigError
from feedsvc.ratelimit import Rate

UTC = dt.UTC


def ms(year: int, month: int, day: int, hour: int = 0, minute: int = 0,
       second: int = 0) -> int:
    return int(dt.datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp()
               * 1000)


NIGHT_NY = QuietHours("22:00", "07:00", "America/New_York")


def test_outside_the_window_sends_now() -> None:
    assert quiet_until(None, ms(2027, 1, 10, 3, 0)) is None
    assert quiet_until(NIGHT_NY, ms(2027, 1, 10, 15, 0)) is None  # 10:00 EST
    assert quiet_until(NIGHT_NY, ms(2027, 1, 10, 12, 0)) is None  # 07:00 EST: end excluded


def test_a_window_crossing_midnight_ends_the_next_morning() -> None:
    # 23:00 EST on Jan 10 -> 07:00 EST on Jan 11 (12:00 UTC)
    assert quiet_until(NIGHT_NY, ms(2027, 1, 11, 4, 0)) == ms(2027, 1, 11, 12, 0)
    # 22:00 exactly is inside
    assert quiet_until(NIGHT_NY, ms(2027, 1, 11, 3, 0)) == ms(2027, 1, 11, 12, 0)
    # 06:59 EST, after midnight: the same morning
    assert quiet_until(NIGHT_NY, ms(2027, 1, 11, 11, 59)) == ms(2027, 1, 11, 12, 0)
    day = QuietHours("09:00", "17:00", "Europe/Paris")
    assert quiet_until(day, ms(2027, 1, 11, 9, 0)) == ms(2027, 1, 11, 16, 0)  # 10:00 CET
    assert quiet_until(day, ms(2027, 1, 11, 17, 0)) is None  # 18:00 CET


def test_a_window_spanning_the_spring_forward_night_is_an_hour_shorter() -> None:
    # 2027-03-14 02:00 EST -> 03:00 EDT in New York. At 01:30 EST (06:30 UTC) the window
    # ends at 07:00 EDT = 11:00 UTC: 4.5 hours later, not the 5.5 the wall clock suggests.
    now = ms(2027, 3, 14, 6, 30)
    assert quiet_until(NIGHT_NY, now) == ms(2027, 3, 14, 11, 0)
    # Started the evening before (23:00 EST): still 07:00 EDT.
    assert quiet_until(NIGHT_NY, ms(2027, 3, 14, 4, 0)) == ms(2027, 3, 14, 11, 0)
    # An end inside the skipped hour (02:30 does not exist): read with the offset before
    # the change, 02:30 EST = 07:30 UTC = 03:30 EDT.
    gap = QuietHours("01:00", "02:30", "America/New_York")
    assert quiet_until(gap, ms(2027, 3, 14, 6, 15)) == ms(2027, 3, 14, 7, 30)


def test_a_window_spanning_the_fall_back_night_is_an_hour_longer() -> None:
    # 2027-11-07 02:00 EDT -> 01:00 EST. At 23:00 EDT (03:00 UTC) the window ends at
    # 07:00 EST = 12:00 UTC: 9 hours later.
    assert quiet_until(NIGHT_NY, ms(2027, 11, 7, 3, 0)) == ms(2027, 11, 7, 12, 0)
    # 01:30 happens twice; both are inside, and both end at 07:00 EST.
    assert quiet_until(NIGHT_NY, ms(2027, 11, 7, 5, 30)) == ms(2027, 11, 7, 12, 0)
    assert quiet_until(NIGHT_NY, ms(2027, 11, 7, 6, 30)) == ms(2027, 11, 7, 12, 0)


@pytest.mark.parametrize(("quiet", "field"), [
    (QuietHours("25:00", "07:00", "UTC"), "quiet_hours.start"),
    (QuietHours("22:00", "7:00", "UTC"), "quiet_hours.end"),
    (QuietHours("22:00", "07:60", "UTC"), "quiet_hours.end"),
    (QuietHours("22:00", "07:00", "Mars/Olympus"), "quiet_hours.timezone"),
    (QuietHours("22:00", "07:00", "../../etc/passwd"), "quiet_hours.timezone"),
    (QuietHours("22:00", "07:00", ""), "quiet_hours.timezone"),
    (QuietHours("22:00", "22:00", "UTC"), "quiet_hours.end"),
])
def test_bad_quiet_hours_name_their_field(quiet: QuietHours, field: str) -> None:
    with pytest.raises(QuietHoursError) as caught:
        check_quiet_hours(quiet)
    assert caught.value.field == field


def test_rate_windows_and_limits() -> None:
    hourly = Rate(10, 3600.0)
    window = rate_window(hourly, ms(2027, 1, 1, 10, 59, 59))
    assert (window.start_ms, window.end_ms) == (ms(2027, 1, 1, 10), ms(2027, 1, 1, 11))
    assert rate_window(hourly, ms(2027, 1, 1, 11)).start_ms == ms(2027, 1, 1, 11)
    assert window.key("u", "push") == f"u/push/{window.start_ms}"
    assert not over_limit(10, hourly)
    assert over_limit(11, hourly)


def test_notify_rate_setting() -> None:
    rates = parse_notify_rate("push=20/1h,email=1/1h")
    assert rates == {"push": Rate(20, 3600.0), "sms": Rate(3, 3600.0),
                     "email": Rate(1, 3600.0)}
    assert parse_notify_rate("5/10m") == dict.fromkeys(("push", "sms", "email"),
                                                        Rate(5, 600.0))
    assert Settings().notify_rate == {"push": Rate(10, 3600.0), "sms": Rate(3, 3600.0),
                                      "email": Rate(3, 3600.0)}
    for bad in ("fax=1/1h", "push=lots", "push"):
        with pytest.raises(ConfigError, match="FEEDSVC_NOTIFY_RATE"):
            Settings.load({"FEEDSVC_NOTIFY_RATE": bad})


def test_digest_text() -> None:
    assert digest_text(1, ["a"]) == ("1 new notification", "a")
    assert digest_text(40, ["a", "b", "c", "d"]) == ("40 new notifications",
                                                       "a; b; c; and 37 more")


def test_fallback_chains() -> None:
    assert fallback_chain(["sms", "email"], "push") == ("sms", "email")
    assert fallback_chain(["sms", "email"], "sms") == ("email",)
    assert fallback_chain(["push", "sms"], "push") == ("sms",)
    assert fallback_chain(["email"], "email") == ()
    assert next_channel(("sms", "email"), lambda c: c != "sms") == ("email", ())
    assert next_channel(("sms", "email"), lambda c: True) == ("sms", ("email",))
    assert next_channel(("sms",), lambda c: False) is None
    assert may_fall_back(True, "low", ["sms"])
    assert may_fall_back(False, "high", ["sms"])
    assert not may_fall_back(False, "medium", ["sms"])
    assert not may_fall_back(True, "high", [])


CONFIG = BreakerConfig(failures=3, ratio=0.5, window_s=60, cooldown_s=30)


def test_a_breaker_opens_on_consecutive_failures_and_probes_after_the_cooldown() -> None:
    breaker = CircuitBreaker("fcm", CONFIG)
    for t in (0, 1):
        assert breaker.allow(t)
        breaker.record(False, t)
    assert breaker.statistics().state == "closed"
    assert breaker.allow(2)
    breaker.record(False, 2)
    stats = breaker.statistics()
    assert (stats.state, stats.opened_at, stats.retry_at) == ("open", 2, 32)
    assert not breaker.allow(31)
    assert breaker.allow(32)  # the probe ...
    assert breaker.statistics().state == "half_open"
    assert not breaker.allow(32.5)  # ... one at a time
    breaker.record(False, 33)  # failed: open again for another cooldown
    assert breaker.statistics().state == "open"
    assert not breaker.allow(62)
    assert breaker.allow(63)
    breaker.record(True, 63)
    stats = breaker.statistics()
    assert (stats.state, stats.consecutive_failures, stats.calls_in_window) == ("closed", 0, 0)
    assert stats.transitions == 5  # open, half-open, open, half-open, closed
    assert stats.rejected == 3


def test_a_breaker_opens_on_the_failure_ratio_of_its_window() -> None:
    breaker = CircuitBreaker("sms", CONFIG)
    for t in range(10):  # alternating: never 3 in a row, but half of 10 failed
        assert breaker.allow(t)
        breaker.record(t % 2 == 0, t)
    assert breaker.statistics().state == "open"
    # Old calls leave the window: 4 failures spread over 2 minutes never open it.
    calm = CircuitBreaker("email", CONFIG)
    for t in range(0, 120, 3):
        calm.record(t % 12 != 0, float(t))
    assert calm.statistics().state == "closed"


def test_breakers_by_provider() -> None:
    breakers = Breakers(CONFIG)
    assert breakers.get("fcm") is breakers.get("fcm")
    breakers.get("apns")
    assert list(breakers.statistics()) == ["apns", "fcm"]
