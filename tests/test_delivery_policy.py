"""Delivery policy end to end through HTTP on both backends, against the fake providers
and with a fake clock: quiet hours (across a daylight-saving change), rate limits rolling
into a digest, circuit breakers with fallback, escalation of an unopened push."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from feedsvc.delivery.providers.registry import open_providers
from feedsvc.workers import drain
from tests.clock import FakeClock
from tests.conftest import MakeApi
from tests.fakes.ledger import Behaviour
from tests.fakes.suite import Fakes, running_fakes
from tests.test_delivery import Setup, register

UTC = dt.UTC
MESSAGE = {"title": "t", "body": "b"}


@pytest.fixture
async def fakes(tmp_path: Path) -> AsyncIterator[Fakes]:
    async with running_fakes(tmp_path) as running:
        yield running


class Policy(Setup):
    clock: FakeClock

    async def pump(self, step_s: float = 0.0, rounds: int = 1) -> None:
        """``rounds`` times: work every queue until nothing is claimable, then move the
        fake clock ``step_s`` on and make what is due by it claimable."""
        for _ in range(rounds):
            for _ in range(50):  # a loop that never empties the queues fails, not hangs
                await drain(self.api.rt, providers=self.providers)
                await self.api.rt.queue.move_due(self.clock())
                stats = await self.api.rt.queue.stats()
                if not sum(stats.queued.values()):
                    break
            else:
                raise AssertionError(f"the queues do not empty: {stats}")
            self.clock.advance(step_s)
            await self.api.rt.queue.move_due(self.clock())

    async def settle(self, step_s: float, rounds: int = 40) -> None:
        """Pump until nothing is queued or scheduled any more (each round ``step_s`` on)."""
        for _ in range(rounds):
            await self.pump(step_s)
            stats = await self.api.rt.queue.stats()
            if not sum(stats.queued.values()) and not stats.scheduled:
                return
        raise AssertionError(f"still scheduled after {rounds} rounds: {stats}")


async def make_policy(make_api: MakeApi, fakes: Fakes, at: dt.datetime,
                      **settings: Any) -> AsyncIterator[Policy]:
    clock = FakeClock(at)
    api = await make_api(celebrity_threshold=1_000, clock=clock, **fakes.settings(),
                         **settings)
    providers = open_providers(api.rt.settings)
    policy = Policy(api, fakes, providers)
    policy.clock = clock
    try:
        yield policy
    finally:
        await providers.aclose()


# 2027-03-14 01:30 EST in New York, half an hour before clocks spring forward to EDT.
BEFORE_SPRING_FORWARD = dt.datetime(2027, 3, 14, 6, 30, tzinfo=UTC)


@pytest.fixture
async def night(make_api: MakeApi, fakes: Fakes) -> AsyncIterator[Policy]:
    async for policy in make_policy(make_api, fakes, BEFORE_SPRING_FORWARD):
        yield policy


async def test_quiet_hours_delay_to_the_window_end_across_a_dst_change(night: Policy
                                                                       ) -> None:
    s, api = night, night.api
    author, fan = api.user("author"), api.user("fan")
    await api.follow(fan, author)
    await register(s, fan, fcm="tok-fan")
    prefs = f"/v1/users/{fan}/preferences"
    for quiet, field in [
        ({"start": "22:00", "end": "07:00", "timezone": "America/Nowhere"},
         "quiet_hours.timezone"),
        ({"start": "10pm", "end": "07:00", "timezone": "UTC"}, "quiet_hours.start"),
        ({"start": "22:00", "end": "24:00", "timezone": "UTC"}, "quiet_hours.end"),
        ({"start": "22:00", "timezone": "UTC"}, "quiet_hours.end"),
    ]:
        status, body = await s.call("PUT", prefs, {"quiet_hours": quiet})
        assert (status, body["error"]["field"]) == (422, field), quiet
    assert (await s.call("GET", prefs))[1]["quiet_hours"] is None  # nothing changed
    quiet = {"start": "22:00", "end": "07:00", "timezone": "America/New_York"}
    status, body = await s.call("PUT", prefs, {"quiet_hours": quiet},
                                headers=api.token(fan))
    assert (status, body["quiet_hours"]) == (200, quiet)

    calm = await api.post_ok(author, notify={"channels": ["push"], "message": MESSAGE})
    urgent = await api.post_ok(author, notify={"channels": ["push"], "message": MESSAGE,
                                               "critical": True})
    await s.pump()
    ledger = s.fakes.fcm.ledger
    assert list(ledger.accepted) == [f"{urgent}:{fan}:push:android"]  # critical bypasses
    record = (await s.deliveries(calm, fan))[("push", "push")]
    assert (record["status"], record["reason"]) == ("scheduled", "quiet_hours")
    # The window ends at 07:00 EDT = 11:00 UTC: 4.5 hours on, the night being an hour
    # short. A minute before, still nothing.
    await s.pump(step_s=4.5 * 3600 - 60)
    assert len(ledger.accepted) == 1
    await s.pump(step_s=60)
    await s.pump()
    assert set(ledger.accepted) == {f"{urgent}:{fan}:push:android",
                                    f"{calm}:{fan}:push:android"}
    assert (await s.deliveries(calm, fan))[("push", "android")]["status"] == "sent"
    # Turning quiet hours off again: null.
    status, body = await s.call("PUT", prefs, {"quiet_hours": None})
    assert (status, body["quiet_hours"]) == (200, None)


HOUR_START = dt.datetime(2027, 5, 3, 9, 0, tzinfo=UTC)


@pytest.fixture
async def busy(make_api: MakeApi, fakes: Fakes) -> AsyncIterator[Policy]:
    async for policy in make_policy(make_api, fakes, HOUR_START + dt.timedelta(minutes=5)):
        yield policy


async def test_fifty_events_in_a_window_are_ten_pushes_and_one_digest(busy: Policy) -> None:
    s, api = busy, busy.api
    author, fan = api.user("author"), api.user("fan")
    await api.follow(fan, author)
    await register(s, fan, fcm="tok-fan")
    events = [await api.post_ok(author, priority="low",
                                notify={"channels": ["push"],
                                        "message": {"title": f"news {i}", "body": "b"}})
              for i in range(50)]
    await s.pump()
    ledger = s.fakes.fcm.ledger
    assert len(ledger.accepted) == 10
    start_ms = int(HOUR_START.timestamp() * 1000)
    digest_event = f"digest:push:{start_ms}"
    digested = []
    for event_id in events:
        log = await s.deliveries(event_id, fan)
        if ("push", "push") in log:
            record = log[("push", "push")]
            assert (record["status"], record["reason"], record["digest"]) == (
                "suppressed", "digested", f"{digest_event}:{fan}")
            digested.append(event_id)
        else:
            assert log[("push", "android")]["status"] == "sent"
    assert len(digested) == 40
    # The window ends at 10:00; the digest goes out then, once.
    await s.pump(step_s=55 * 60 - 1)
    assert len(ledger.accepted) == 10
    await s.pump(step_s=2)
    await s.pump()
    digest_key = f"{digest_event}:{fan}:push:android"
    assert len(ledger.accepted) == 11 and digest_key in ledger.accepted
    sent = ledger.accepted[digest_key]
    assert sent["title"] == "40 new notifications"
    assert sent["body"].endswith("and 37 more") and sent["body"].startswith("news ")
    assert (await s.deliveries(digest_event, fan))[("push", "android")]["status"] == "sent"
    # The next window starts afresh; a redone digest task sends nothing again.
    await s.settle(step_s=60)
    again = await api.post_ok(author, priority="low",
                              notify={"channels": ["push"], "message": MESSAGE})
    await s.pump()
    assert f"{again}:{fan}:push:android" in ledger.accepted
    assert len(ledger.accepted) == 12 and ledger.repeat_count == 0
    # Critical notifications are not counted or held.
    for _ in range(12):
        await api.post_ok(author, notify={"channels": ["push"], "message": MESSAGE,
                                          "critical": True})
    await s.pump()
    assert len(ledger.accepted) == 24


@pytest.fixture
async def flaky(make_api: MakeApi, fakes: Fakes) -> AsyncIterator[Policy]:
    async for policy in make_policy(make_api, fakes, HOUR_START, breaker_failures=3,
                                    breaker_cooldown=30.0, delivery_max_attempts=6,
                                    notify_rate={"push": _rate(1000), "sms": _rate(1000),
                                                 "email": _rate(1000)}):
        yield policy


def _rate(n: int) -> Any:
    from feedsvc.ratelimit import Rate

    return Rate(n, 3600.0)


async def test_an_open_breaker_falls_back_once_and_the_rest_wait_for_recovery(
        flaky: Policy) -> None:
    s, api = flaky, flaky.api
    author = api.user("author")
    fans = [api.user(f"fan{i}") for i in range(5)]
    phone_only = api.user("phone-only")
    await api.bulk([(f, author) for f in [*fans, phone_only]])
    for i, fan in enumerate(fans):
        await register(s, fan, fcm=f"tok-{i}", phone=f"+1415555010{i}")
    await register(s, phone_only, phone="+14155550199")
    await s.pump()  # backfills
    s.fakes.fcm.behaviour = Behaviour(error_rate=1.0, error_statuses=(503,))

    routine = await api.post_ok(author, notify={"channels": ["push"], "message": MESSAGE})
    await s.pump()
    breaker = api.rt.breakers.statistics()["fcm"]
    assert breaker.state == "open"
    calls_while_failing = s.fakes.fcm.ledger.requests
    assert 3 <= calls_while_failing <= 6  # the breaker stopped the calls (4 in flight)
    log = await s.deliveries(routine, fans[-1])
    assert log[("push", "android")]["status"] == "scheduled"

    # Critical with a fallback: push fails fast, SMS goes out, once per recipient; the
    # recipient with no device at all falls back the same way.
    alert = await api.post_ok(author, notify={"channels": ["push"], "message": MESSAGE,
                                              "critical": True, "fallback": ["sms"]})
    await s.pump()
    assert s.fakes.fcm.ledger.requests == calls_while_failing  # failed fast
    sms = s.fakes.twilio.ledger
    assert set(sms.accepted) == {f"{alert}:{u}:sms:sms" for u in [*fans, phone_only]}
    log = await s.deliveries(alert, fans[0])
    assert (log[("push", "android")]["status"], log[("push", "android")]["reason"]) == (
        "suppressed", "breaker_open_fallback")
    assert (await s.deliveries(routine, phone_only))[("push", "push")]["reason"] == \
        "no_device"  # not critical: no fallback
    # The provider recovers; after the cooldown a probe closes the breaker and every
    # waiting delivery goes out, each once.
    s.fakes.fcm.behaviour = Behaviour()
    await s.settle(step_s=10)
    fcm = s.fakes.fcm.ledger
    assert set(fcm.accepted) == {f"{routine}:{f}:push:android" for f in fans}
    assert fcm.repeat_count == 0 and sms.repeat_count == 0
    assert len(sms.accepted) == len(fans) + 1
    stats = api.rt.breakers.statistics()["fcm"]
    assert stats.state == "closed" and stats.transitions >= 3 and stats.rejected > 0


ESCALATE_AT = dt.datetime(2027, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
async def escalating(make_api: MakeApi, fakes: Fakes) -> AsyncIterator[Policy]:
    async for policy in make_policy(make_api, fakes, ESCALATE_AT):
        yield policy


async def test_an_unopened_push_escalates_once_and_an_opened_one_does_not(
        escalating: Policy) -> None:
    s, api = escalating, escalating.api
    author, reader, sleeper = api.user("author"), api.user("reader"), api.user("sleeper")
    await api.bulk([(reader, author), (sleeper, author)])
    await register(s, reader, fcm="tok-r", phone="+14155550101", email="r@example.com")
    await register(s, sleeper, fcm="tok-s", phone="+14155550102", email="s@example.com")
    await s.call("PUT", f"/v1/users/{sleeper}/preferences", {"channels": {"sms": False}})
    event_id = await api.post_ok(author, notify={
        "channels": ["push"], "message": MESSAGE,
        "escalate": {"after": 300, "to": ["sms", "email"]}})
    await s.pump()
    assert len(s.fakes.fcm.ledger.accepted) == 2

    opened = f"/v1/notifications/{event_id}:{reader}/opened"
    assert (await s.call("POST", opened))[0] == 403  # the service key is not the reader
    assert (await s.call("POST", opened, headers=api.token(sleeper)))[0] == 403
    status, body = await s.call("POST", f"/v1/notifications/nope:{reader}/opened",
                                headers=api.token(reader))
    assert (status, body["error"]["code"]) == (404, "not_found")
    status, _ = await s.call("POST", f"/v1/notifications/{'x' * 200}:{reader}/opened",
                             headers=api.token(reader))
    assert status == 400
    assert await s.call("POST", opened, headers=api.token(reader)) == (204, None)

    await s.pump(step_s=299)
    assert not s.fakes.twilio.ledger.accepted and not s.fakes.smtp.ledger.accepted
    await s.pump(step_s=2)
    await s.settle(step_s=60)
    # The reader opened it: nothing more. The sleeper turned SMS off: email, once.
    assert not s.fakes.twilio.ledger.accepted
    assert set(s.fakes.smtp.ledger.accepted) == {f"{event_id}:{sleeper}:email:email"}
    reader_log = await s.deliveries(event_id, reader)
    assert reader_log[("sms", "escalation")]["reason"] == "opened"
    sleeper_log = await s.deliveries(event_id, sleeper)
    assert sleeper_log[("email", "email")]["status"] == "sent"
    # An escalation check redone (at-least-once) sends nothing twice.
    event = await api.rt.store.get_event(event_id)
    assert event is not None
    from feedsvc.model import Envelope, EscalateTask

    await api.rt.queue.enqueue("medium", Envelope(EscalateTask(event, sleeper),
                                                  api.rt.now_ms()), queue="email")
    await s.settle(step_s=60)
    assert len(s.fakes.smtp.ledger.accepted) == 1 and s.fakes.smtp.ledger.repeat_count == 0


async def test_a_digest_template_is_used_when_defined(busy: Policy) -> None:
    s, api = busy, busy.api
    digest = {"locales": {"en": {"title": "{{ data.count }} updates",
                                 "body": "{{ data.titles | join(', ') }}"}}}
    assert (await s.call("PUT", "/v1/templates/digest", digest))[0] == 200
    author, fan = api.user("author"), api.user("fan")
    await api.follow(fan, author)
    await register(s, fan, email="fan@example.com")
    for i in range(5):  # email: 3 an hour by default
        await api.post_ok(author, notify={"channels": ["email"],
                                          "message": {"title": f"n{i}", "body": "b"}})
    await s.pump()
    mail = s.fakes.smtp.ledger
    assert len(mail.accepted) == 3
    await s.settle(step_s=30 * 60)
    assert len(mail.accepted) == 4
    start_ms = int(HOUR_START.timestamp() * 1000)
    sent = mail.accepted[f"digest:email:{start_ms}:{fan}:email:email"]
    assert sent["subject"] == "2 updates"
    assert set(sent["body"].strip().split(", ")) <= {f"n{i}" for i in range(5)}


async def test_policy_state_contract(runtime: Any, prefix: str) -> None:
    """The ``PolicyState`` port on both backends: arrival order (a repeat keeps its
    number), held items in arrival order, marks."""
    policy = runtime.delivery.policy_state
    window = f"{prefix}-u/push/0"
    assert [await policy.arrive(window, m, 60) for m in ("a", "b", "a", "c")] == [1, 2, 1, 3]
    assert await policy.arrive(f"{prefix}-other/push/0", "a", 60) == 1
    await policy.hold(window, 3, b"third", 60)
    await policy.hold(window, 2, b"second", 60)
    await policy.hold(window, 3, b"third", 60)  # a redo
    assert await policy.held(window) == [b"second", b"third"]
    assert await policy.held(f"{prefix}-none") == []
    assert not await policy.marked(f"{prefix}-opened")
    await policy.mark(f"{prefix}-opened", 60)
    assert await policy.marked(f"{prefix}-opened")


@pytest.fixture
async def stubborn(make_api: MakeApi, fakes: Fakes) -> AsyncIterator[Policy]:
    async for policy in make_policy(make_api, fakes, HOUR_START, breaker_failures=100,
                                    delivery_max_attempts=2):
        yield policy


async def test_exhausted_retries_fall_back_for_high_priority_only(stubborn: Policy) -> None:
    s, api = stubborn, stubborn.api
    author, fan = api.user("author"), api.user("fan")
    await api.follow(fan, author)
    await register(s, fan, fcm="tok-fan", email="fan@example.com")
    s.fakes.fcm.behaviour = Behaviour(error_rate=1.0, error_statuses=(503,))
    notify = {"channels": ["push"], "message": MESSAGE, "fallback": ["email"]}
    high = await api.post_ok(author, priority="high", notify=notify)
    medium = await api.post_ok(author, notify=notify)
    await s.settle(step_s=5)
    high_log = (await s.deliveries(high, fan))[("push", "android")]
    assert (high_log["status"], high_log["reason"]) == ("failed", "exhausted_fell_back")
    medium_log = (await s.deliveries(medium, fan))[("push", "android")]
    assert (medium_log["status"], medium_log["reason"]) == ("dead", "exhausted")
    assert set(s.fakes.smtp.ledger.accepted) == {f"{high}:{fan}:email:email"}
    # Only the delivery that did not fall back is in the dead letters: replaying them all
    # cannot reach the user on push after the fallback email.
    letters = (await s.call("GET", "/v1/dlq"))[1]["items"]
    assert [item["key"] for item in letters] == [f"{medium}:{fan}:push:android"]
    assert api.rt.breakers.statistics()["fcm"].state == "closed"
