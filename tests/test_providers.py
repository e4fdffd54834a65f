"""Provider adapters against their fake servers (tests/fakes): real sockets, real wire
protocols, real crypto. No adapter of ours is mocked."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from feedsvc.config import Settings
from feedsvc.delivery.providers import http
from feedsvc.delivery.providers.apns import TOKEN_REUSE, ApnsProvider
from feedsvc.delivery.providers.base import Outgoing, WebPushKeys, key_uuid
from feedsvc.delivery.providers.email import EmailProvider, SmtpServer, message_id
from feedsvc.delivery.providers.fcm import FcmProvider, ServiceAccount
from feedsvc.delivery.providers.registry import open_providers
from feedsvc.delivery.providers.sms import SmsProvider
from feedsvc.delivery.providers.webpush import WebPushProvider, load_vapid
from feedsvc.errors import (
    ConfigError,
    DeadTarget,
    PermanentError,
    ProviderRejected,
    ProviderUnavailable,
    RetryableError,
)
from tests.fakes import apns as fake_apns
from tests.fakes import twilio as fake_twilio
from tests.fakes.apns import FakeApns
from tests.fakes.fcm import FakeFcm
from tests.fakes.ledger import Behaviour, free_port
from tests.fakes.smtp import FakeSmtp
from tests.fakes.twilio import FakeTwilio
from tests.fakes.webpush import FakeWebPush, new_vapid_key


def outgoing(key: str, kind: str = "fcm", address: str = "tok-1", **kw: object) -> Outgoing:
    values: dict[str, object] = {
        "key": key, "kind": kind, "address": address, "title": "School closed",
        "body": "No school tomorrow", "data": {"notification_id": "e1:u1", "event_id": "e1"}}
    values.update(kw)
    return Outgoing(**values)  # type: ignore[arg-type]


@pytest.fixture
async def client() -> AsyncIterator[http.AiohttpClient]:
    c = http.open_client(5.0)
    yield c
    await c.aclose()


# --------------------------------------------------------------------------- FCM


@pytest.fixture
async def fcm() -> AsyncIterator[FakeFcm]:
    async with FakeFcm().running() as fake:
        yield fake


def fcm_provider(fake: FakeFcm, client: http.HttpClient, tmp_path: Path) -> FcmProvider:
    account = ServiceAccount.from_file(fake.write_credentials(tmp_path / "sa.json"))
    return FcmProvider(fake.project, account, client, fake.url)


async def test_fcm_sends_with_one_oauth_token_for_many(
    fcm: FakeFcm, client: http.HttpClient, tmp_path: Path
) -> None:
    provider = fcm_provider(fcm, client, tmp_path)
    receipts = await asyncio.gather(*(provider.send(outgoing(f"e1:u{i}:push:d1",
                                                             address=f"tok-{i}"))
                                      for i in range(30)))
    assert fcm.token_requests == 1 and provider.tokens.fetches == 1
    assert len(fcm.ledger.accepted) == 30 and fcm.ledger.missing_key == 0
    got = fcm.ledger.accepted["e1:u7:push:d1"]
    assert got == {"token": "tok-7", "title": "School closed", "body": "No school tomorrow",
                   "data": {"notification_id": "e1:u1", "event_id": "e1"}}
    assert receipts[0].provider == "fcm"
    assert receipts[0].message_id.startswith(f"projects/{fcm.project}/messages/")
    await provider.send(outgoing("again", address="tok-x"))
    assert fcm.token_requests == 1  # still cached


async def test_fcm_repeat_of_an_accepted_key_is_one_delivery(
    fcm: FakeFcm, client: http.HttpClient, tmp_path: Path
) -> None:
    provider = fcm_provider(fcm, client, tmp_path)
    first = await provider.send(outgoing("k1"))
    second = await provider.send(outgoing("k1"))
    assert first == second
    assert len(fcm.ledger.accepted) == 1 and fcm.ledger.repeats["k1"] == 1


@pytest.mark.parametrize("status", [503, 429, 500])
async def test_fcm_transient_answers_carry_retry_after(
    fcm: FakeFcm, client: http.HttpClient, tmp_path: Path, status: int
) -> None:
    provider = fcm_provider(fcm, client, tmp_path)
    fcm.behaviour.retry_after = 7
    fcm.behaviour.script = [status]
    with pytest.raises(ProviderUnavailable) as info:
        await provider.send(outgoing("k1"))
    assert isinstance(info.value, RetryableError)
    assert info.value.status == status
    assert info.value.retry_after == (7.0 if status in (429, 503) else None)
    await provider.send(outgoing("k1"))  # the retry goes through
    assert list(fcm.ledger.accepted) == ["k1"]


async def test_fcm_dead_tokens(fcm: FakeFcm, client: http.HttpClient, tmp_path: Path) -> None:
    provider = fcm_provider(fcm, client, tmp_path)
    fcm.behaviour.dead.add("gone")
    fcm.invalid_tokens.add("garbage")
    with pytest.raises(DeadTarget) as unregistered:
        await provider.send(outgoing("k1", address="gone"))
    assert unregistered.value.reason == "unregistered" and unregistered.value.status == 404
    with pytest.raises(DeadTarget) as invalid:
        await provider.send(outgoing("k2", address="garbage"))
    assert invalid.value.reason == "invalid_token" and invalid.value.status == 400
    assert not fcm.ledger.accepted


async def test_fcm_invalid_argument_not_naming_the_token_is_rejected(
    fcm: FakeFcm, client: http.HttpClient, tmp_path: Path
) -> None:
    provider = fcm_provider(fcm, client, tmp_path)
    fcm.behaviour.script = [400]
    with pytest.raises(ProviderRejected) as info:
        await provider.send(outgoing("k1"))
    assert not isinstance(info.value, DeadTarget) and isinstance(info.value, PermanentError)


async def test_fcm_renews_a_refused_access_token(
    fcm: FakeFcm, client: http.HttpClient, tmp_path: Path
) -> None:
    provider = fcm_provider(fcm, client, tmp_path)
    await provider.send(outgoing("k1"))
    fcm.access_tokens.clear()  # the provider forgot or expired it early
    with pytest.raises(ProviderUnavailable):
        await provider.send(outgoing("k2"))
    await provider.send(outgoing("k2"))
    assert fcm.token_requests == 2 and set(fcm.ledger.accepted) == {"k1", "k2"}


async def test_fcm_refetches_a_token_when_it_expires(
    client: http.HttpClient, tmp_path: Path
) -> None:
    async with FakeFcm(token_lifetime=1).running() as fake:
        provider = fcm_provider(fake, client, tmp_path)
        await provider.send(outgoing("k1"))
        await provider.send(outgoing("k2"))
        assert fake.token_requests == 1
        await asyncio.sleep(1.1)
        await provider.send(outgoing("k3"))
        assert fake.token_requests == 2


async def test_fcm_wrong_key_is_refused_at_the_token_endpoint(
    fcm: FakeFcm, client: http.HttpClient, tmp_path: Path
) -> None:
    other = FakeFcm(key=rsa.generate_private_key(public_exponent=65537, key_size=2048))
    info = other.service_account()
    account = ServiceAccount(info["client_email"], info["private_key"], fcm.token_uri)
    provider = FcmProvider(fcm.project, account, client, fcm.url)
    with pytest.raises(ProviderRejected, match="invalid_grant"):
        await provider.send(outgoing("k1"))
    assert fcm.bad_assertions == 1 and not fcm.ledger.accepted


async def test_fcm_timeouts_and_refused_connections_are_transient(
    fcm: FakeFcm, tmp_path: Path
) -> None:
    fast = http.open_client(0.3)
    try:
        provider = fcm_provider(fcm, fast, tmp_path)
        await provider.send(outgoing("k0"))  # token fetched
        fcm.behaviour.timeout_rate, fcm.behaviour.hang = 1.0, 2.0
        with pytest.raises(ProviderUnavailable, match="timeout"):
            await provider.send(outgoing("k1"))
        closed = FcmProvider(fcm.project, provider.tokens.account, fast,
                             f"http://127.0.0.1:{free_port()}")
        closed.tokens = provider.tokens  # skip the token fetch: the send itself fails
        with pytest.raises(ProviderUnavailable):
            await closed.send(outgoing("k2"))
    finally:
        await fast.aclose()


# --------------------------------------------------------------------------- APNs


@pytest.fixture
async def apns() -> AsyncIterator[FakeApns]:
    async with FakeApns().running() as fake:
        yield fake


def apns_provider(fake: FakeApns) -> ApnsProvider:
    return ApnsProvider(fake.key_pem(), fake_apns.KEY_ID, fake_apns.TEAM_ID, fake.topic,
                        fake.url, timeout=5.0)


async def test_apns_sends_over_http2_and_reuses_the_provider_token(apns: FakeApns) -> None:
    provider = apns_provider(apns)
    try:
        receipts = await asyncio.gather(*(
            provider.send(outgoing(f"e1:u{i}:push:d1", kind="apns", address=f"a{i}",
                                   priority="low" if i % 2 else "high"))
            for i in range(20)))
    finally:
        await provider.aclose()
    assert len(apns.ledger.accepted) == 20 and apns.ledger.missing_key == 0
    got = apns.ledger.accepted["e1:u3:push:d1"]
    assert got["token"] == "a3" and got["apns-priority"] == "5"
    assert apns.ledger.accepted["e1:u2:push:d1"]["apns-priority"] == "10"
    assert got["apns-id"] == str(key_uuid("e1:u3:push:d1"))
    assert got["alert"] == {"title": "School closed", "body": "No school tomorrow"}
    assert got["payload"]["event_id"] == "e1"
    assert receipts[3].message_id == str(key_uuid("e1:u3:push:d1"))
    assert len(apns.provider_tokens) == 1 and provider.tokens.signed == 1
    assert apns.connections == 1  # one multiplexed HTTP/2 connection


def test_apns_provider_token_is_renewed_after_its_reuse_window() -> None:
    fake = FakeApns()
    provider = apns_provider(fake)
    start = time.time()
    first = provider.tokens.get(start)
    assert provider.tokens.get(start + TOKEN_REUSE - 1) == first
    assert provider.tokens.get(start + TOKEN_REUSE) != first
    assert provider.tokens.signed == 2


async def test_apns_failures(apns: FakeApns) -> None:
    provider = apns_provider(apns)
    apns.behaviour.dead.add("gone")
    apns.bad_tokens.add("bad")
    apns.behaviour.retry_after = 3
    try:
        with pytest.raises(DeadTarget) as gone:
            await provider.send(outgoing("k1", kind="apns", address="gone"))
        assert gone.value.reason == "unregistered" and gone.value.status == 410
        with pytest.raises(DeadTarget) as bad:
            await provider.send(outgoing("k2", kind="apns", address="bad"))
        assert bad.value.reason == "bad_device_token"
        apns.behaviour.script = [429, 503, 400]
        for expected in (429, 503):
            with pytest.raises(ProviderUnavailable) as busy:
                await provider.send(outgoing("k3", kind="apns", address="ok"))
            assert busy.value.status == expected and busy.value.retry_after == 3.0
        with pytest.raises(ProviderRejected) as rejected:
            await provider.send(outgoing("k3", kind="apns", address="ok"))
        assert not isinstance(rejected.value, DeadTarget) and "BadMessageId" in str(rejected.value)
        await provider.send(outgoing("k3", kind="apns", address="ok"))
        assert list(apns.ledger.accepted) == ["k3"]
    finally:
        await provider.aclose()


async def test_apns_refused_provider_token_is_renewed(apns: FakeApns) -> None:
    provider = apns_provider(apns)
    wrong = FakeApns()  # another key: APNs answers 403 InvalidProviderToken
    provider.tokens.key_pem = wrong.key_pem()
    try:
        with pytest.raises(ProviderUnavailable, match="InvalidProviderToken"):
            await provider.send(outgoing("k1", kind="apns"))
        provider.tokens.key_pem = apns.key_pem()
        await provider.send(outgoing("k1", kind="apns"))
        assert provider.tokens.signed == 2 and list(apns.ledger.accepted) == ["k1"]
    finally:
        await provider.aclose()


# --------------------------------------------------------------------------- Web Push


@pytest.fixture
def vapid_keys() -> tuple[str, str]:
    return new_vapid_key()


@pytest.fixture
async def webpush(vapid_keys: tuple[str, str]) -> AsyncIterator[FakeWebPush]:
    async with FakeWebPush(application_server_key=vapid_keys[1]).running() as fake:
        yield fake


def push_to(fake: FakeWebPush, key: str, **kw: object) -> Outgoing:
    sub = fake.subscribe()
    return outgoing(key, kind="webpush", address=sub.endpoint,
                    webpush=WebPushKeys(sub.p256dh, sub.auth_b64), **kw)


async def test_webpush_body_decrypts_with_the_subscription_key(
    webpush: FakeWebPush, client: http.HttpClient, vapid_keys: tuple[str, str]
) -> None:
    provider = WebPushProvider(load_vapid(vapid_keys[0], "mailto:ops@example.org"),
                               "mailto:ops@example.org", client)
    receipt = await provider.send(push_to(webpush, "k1", priority="low"))
    await provider.send(push_to(webpush, "k2"))
    got = webpush.ledger.accepted["k1"]
    assert got["message"] == {"title": "School closed", "body": "No school tomorrow",
                              "data": {"notification_id": "e1:u1", "event_id": "e1"}}
    assert got["urgency"] == "low" and int(got["ttl"]) > 0
    assert webpush.ledger.accepted["k2"]["urgency"] == "normal"
    assert receipt.message_id.startswith(webpush.url + "/message/")
    assert webpush.bad_vapid == 0 and webpush.ledger.missing_key == 0
    auth = [h["Authorization"] for h in webpush.headers_seen]
    assert auth[0] == auth[1]  # one VAPID signature reused for the origin


async def test_webpush_wrong_vapid_key_is_refused(
    webpush: FakeWebPush, client: http.HttpClient
) -> None:
    other_private, _ = new_vapid_key()
    provider = WebPushProvider(load_vapid(other_private, "mailto:ops@example.org"),
                               "mailto:ops@example.org", client)
    with pytest.raises(ProviderRejected, match="401"):
        await provider.send(push_to(webpush, "k1"))
    assert webpush.bad_vapid == 1 and not webpush.ledger.accepted


async def test_webpush_failures(
    webpush: FakeWebPush, client: http.HttpClient, vapid_keys: tuple[str, str]
) -> None:
    provider = WebPushProvider(load_vapid(vapid_keys[0], "https://example.org/contact"),
                               "https://example.org/contact", client)
    gone = push_to(webpush, "k1")
    webpush.behaviour.dead.add(gone.address.rsplit("/", 1)[1])
    with pytest.raises(DeadTarget) as dead:
        await provider.send(gone)
    assert dead.value.status == 410 and dead.value.reason == "subscription_gone"
    unknown = push_to(webpush, "k2")
    webpush.subscriptions.clear()
    with pytest.raises(DeadTarget) as missing:
        await provider.send(unknown)
    assert missing.value.status == 404
    webpush.behaviour.retry_after = 11
    webpush.behaviour.script = [503]
    with pytest.raises(ProviderUnavailable) as busy:
        await provider.send(push_to(webpush, "k3"))
    assert busy.value.retry_after == 11.0


def test_vapid_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="FEEDSVC_VAPID_PRIVATE_KEY"):
        load_vapid("c2hvcnQ", "mailto:a@example.org")
    with pytest.raises(ConfigError, match="FEEDSVC_VAPID_SUBJECT"):
        load_vapid(new_vapid_key()[0], "ops@example.org")


# --------------------------------------------------------------------------- SMS


@pytest.fixture
async def twilio() -> AsyncIterator[FakeTwilio]:
    async with FakeTwilio().running() as fake:
        yield fake


def sms_provider(fake: FakeTwilio, client: http.HttpClient, token: str = "") -> SmsProvider:
    return SmsProvider(fake_twilio.ACCOUNT_SID, token or fake_twilio.AUTH_TOKEN,
                       fake_twilio.FROM, client, fake.url)


async def test_sms_sends_a_form_with_basic_auth(
    twilio: FakeTwilio, client: http.HttpClient
) -> None:
    twilio.behaviour.latency = 0.3
    started = time.monotonic()
    receipt = await sms_provider(twilio, client).send(outgoing("k1", kind="sms",
                                                               address="+15551230001"))
    assert time.monotonic() - started >= 0.3  # the fake's latency is real
    assert twilio.ledger.accepted["k1"] == {"to": "+15551230001", "from": fake_twilio.FROM,
                                            "body": "School closed: No school tomorrow"}
    assert receipt.message_id.startswith("SM")
    with pytest.raises(ProviderRejected, match="20003"):
        await sms_provider(twilio, client, "wrong").send(outgoing("k2", kind="sms"))


@pytest.mark.parametrize(("code", "reason"), [(21211, "invalid_number"),
                                              (21610, "unsubscribed"), (21614, "not_mobile")])
async def test_sms_dead_numbers(
    twilio: FakeTwilio, client: http.HttpClient, code: int, reason: str
) -> None:
    twilio.dead_numbers["+15550000000"] = code
    with pytest.raises(DeadTarget) as info:
        await sms_provider(twilio, client).send(outgoing("k1", kind="sms",
                                                         address="+15550000000"))
    assert info.value.reason == reason


async def test_sms_transient_and_permanent(twilio: FakeTwilio, client: http.HttpClient) -> None:
    provider = sms_provider(twilio, client)
    twilio.behaviour.retry_after = 2
    twilio.behaviour.script = [429, 400]
    with pytest.raises(ProviderUnavailable) as busy:
        await provider.send(outgoing("k1", kind="sms", address="+15551230001"))
    assert busy.value.retry_after == 2.0 and busy.value.status == 429
    with pytest.raises(ProviderRejected) as rejected:
        await provider.send(outgoing("k1", kind="sms", address="+15551230001"))
    assert not isinstance(rejected.value, DeadTarget)


# --------------------------------------------------------------------------- email


@pytest.fixture
async def smtp() -> AsyncIterator[FakeSmtp]:
    async with FakeSmtp().running() as fake:
        yield fake


def email_provider(fake: FakeSmtp, url: str = "") -> EmailProvider:
    return EmailProvider(SmtpServer(url or fake.url), "Feed <notify@feed.example>", timeout=3)


async def test_email_is_sent_with_a_message_id_from_the_key(smtp: FakeSmtp) -> None:
    provider = email_provider(smtp)
    receipt = await provider.send(outgoing("e1:u1:email:email", kind="email",
                                           address="parent@example.org",
                                           title="School\nclosed"))
    got = smtp.ledger.accepted["e1:u1:email:email"]
    assert got["to"] == ["parent@example.org"] and got["subject"] == "School closed"
    assert got["body"].strip() == "No school tomorrow"
    assert got["message_id"] == receipt.message_id == message_id(
        "e1:u1:email:email", "notify@feed.example")
    await provider.send(outgoing("e1:u1:email:email", kind="email",
                                 address="parent@example.org"))
    assert len(smtp.ledger.accepted) == 1 and smtp.ledger.repeat_count == 1


async def test_email_failures(smtp: FakeSmtp) -> None:
    provider = email_provider(smtp)
    smtp.behaviour.dead.add("nobody@example.org")
    with pytest.raises(DeadTarget) as bounce:
        await provider.send(outgoing("k1", kind="email", address="nobody@example.org"))
    assert bounce.value.reason == "hard_bounce" and bounce.value.status == 550
    smtp.behaviour.script = [451]
    with pytest.raises(ProviderUnavailable) as later:
        await provider.send(outgoing("k2", kind="email", address="a@example.org"))
    assert later.value.status == 451
    with pytest.raises(DeadTarget) as malformed:
        await provider.send(outgoing("k4", kind="email", address="a@example.org\nBcc: x@y.z"))
    assert malformed.value.reason == "invalid_address"
    closed = email_provider(smtp, f"smtp://127.0.0.1:{free_port()}")
    with pytest.raises(ProviderUnavailable):
        await closed.send(outgoing("k3", kind="email", address="a@example.org"))
    assert not smtp.ledger.accepted


def test_smtp_urls() -> None:
    plain = SmtpServer("smtp://user%40x:p%3Ass@mail.example:2525?starttls=true")
    assert (plain.hostname, plain.port, plain.username, plain.password) == (
        "mail.example", 2525, "user@x", "p:ss")
    assert plain.start_tls and not plain.use_tls
    tls = SmtpServer("smtps://mail.example")
    assert tls.use_tls and tls.port == 465 and not tls.start_tls
    assert SmtpServer("smtp://mail.example").port == 25
    with pytest.raises(ConfigError):
        SmtpServer("smtps://mail.example?starttls=true")


# --------------------------------------------------------------------------- registry


async def test_open_providers_builds_what_is_configured(
    fcm: FakeFcm, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    nothing = open_providers(Settings())
    assert nothing.unconfigured_channels() == ["push", "sms", "email"]
    assert nothing.for_target("fcm") is None
    with caplog.at_level("WARNING", logger="feedsvc.delivery.providers.registry"):
        nothing.warn_unconfigured()
    assert [r.getMessage().split()[1] for r in caplog.records] == ["push", "sms", "email"]
    assert all("channel_not_configured" in r.getMessage() for r in caplog.records)
    await nothing.aclose()

    apns = FakeApns()
    settings = Settings(
        fcm_project_id=fcm.project, fcm_credentials=fcm.write_credentials(tmp_path / "sa.json"),
        fcm_url=fcm.url, apns_key_file=apns.write_key(tmp_path / "k.p8"),
        apns_key_id=fake_apns.KEY_ID, apns_team_id=fake_apns.TEAM_ID, apns_topic="t",
        console_channels=("email",))
    providers = open_providers(settings)
    try:
        assert sorted(providers.adapters) == ["apns", "email", "fcm"]
        assert providers.unconfigured_channels() == ["sms"]
        fcm_adapter = providers.for_target("fcm")
        assert fcm_adapter is not None
        await fcm_adapter.send(outgoing("k1"))
        email = providers.for_target("email")
        assert email is not None and email.name == "log"
        assert (await email.send(outgoing("k2", kind="email"))).message_id == "log:k2"
    finally:
        await providers.aclose()
    assert list(fcm.ledger.accepted) == ["k1"]


def test_half_configured_providers_fail_at_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"FEEDSVC_SMS_AUTH_TOKEN.*FEEDSVC_SMS_FROM"):
        open_providers(Settings(sms_account_sid="AC1"))
    with pytest.raises(ConfigError, match="FEEDSVC_FCM_CREDENTIALS"):
        open_providers(Settings(fcm_project_id="p", fcm_credentials=tmp_path / "none.json"))
    with pytest.raises(ConfigError, match="FEEDSVC_APNS_KEY_FILE"):
        (tmp_path / "k.p8").write_text("not a key")
        open_providers(Settings(apns_key_file=tmp_path / "k.p8", apns_key_id="k",
                                apns_team_id="t", apns_topic="x"))


def test_provider_settings_from_the_environment() -> None:
    settings = Settings.load({
        "FEEDSVC_FCM_PROJECT_ID": "p", "FEEDSVC_FCM_URL": "http://127.0.0.1:9/",
        "FEEDSVC_SMTP_URL": "smtps://u:p@mail.example:465", "FEEDSVC_EMAIL_FROM": "a@b.c",
        "FEEDSVC_CONSOLE_CHANNELS": "push,sms", "FEEDSVC_DELIVERY_MAX_ATTEMPTS": "3",
        "FEEDSVC_PROVIDER_TIMEOUT": "2s",
    })
    assert settings.fcm_url == "http://127.0.0.1:9" and settings.fcm_project_id == "p"
    assert settings.console_channels == ("push", "sms")
    assert settings.delivery_max_attempts == 3 and settings.provider_timeout == 2.0
    assert Settings().delivery_max_attempts == 8
    assert Settings().apns_url == "https://api.push.apple.com"
    for env, value in [("FEEDSVC_FCM_URL", "fcm.example"), ("FEEDSVC_SMTP_URL", "mail:25"),
                       ("FEEDSVC_CONSOLE_CHANNELS", "pigeon"),
                       ("FEEDSVC_DELIVERY_MAX_ATTEMPTS", "0")]:
        with pytest.raises(ConfigError, match=env):
            Settings.load({env: value})


def test_retry_after_forms() -> None:
    assert http.parse_retry_after("120") == 120.0
    assert http.parse_retry_after(None) is None and http.parse_retry_after("soon") is None
    assert http.parse_retry_after("Wed, 02 Dec 2026 10:00:30 GMT",
                                  now=1796205600.0) == 30.0
    assert http.parse_retry_after("99999") == http.MAX_RETRY_AFTER


@pytest.mark.parametrize("client_lib", ["httpx", "aiohttp"])
async def test_fcm_ceiling_helper_sends_accepted_requests(
    fcm: FakeFcm, tmp_path: Path, client_lib: str
) -> None:
    from loadtest.fake_ceiling import fetch_access_token, measure_fcm_ceiling

    token = await fetch_access_token(fcm.write_credentials(tmp_path / "sa.json"))
    ceiling = await measure_fcm_ceiling(fcm.url, fcm.project, token, requests=60,
                                        concurrency=8, client=client_lib)
    assert ceiling.errors == 0 and ceiling.per_second > 0
    assert len(fcm.ledger.accepted) == 60 and fcm.ledger.repeat_count == 0


async def test_fcm_adapter_measure_sends_through_the_provider(
    fcm: FakeFcm, tmp_path: Path
) -> None:
    from loadtest.fake_ceiling import measure_fcm_adapter

    result = await measure_fcm_adapter(fcm.url, fcm.write_credentials(tmp_path / "sa.json"),
                                       requests=40, concurrency=8)
    assert result.errors == 0 and len(fcm.ledger.accepted) == 40
    assert fcm.token_requests == 1


async def test_fcm_under_failures_every_delivery_lands_once(fcm: FakeFcm, tmp_path: Path) -> None:
    """20% 503/429 and 4% hangs: retrying what is transient lands every key; a key is
    repeated only after a client-side timeout (the fake may have accepted it meanwhile)."""
    fcm.behaviour = Behaviour(error_rate=0.2, timeout_rate=0.04, hang=1.5, seed=7,
                              retry_after=1)
    fast = http.open_client(0.5)
    provider = fcm_provider(fcm, fast, tmp_path)
    transient = timeouts = 0
    limit = asyncio.Semaphore(20)

    async def deliver(i: int) -> None:
        nonlocal transient, timeouts
        async with limit:
            for _ in range(30):
                try:
                    await provider.send(outgoing(f"e9:u{i}:push:d1", address=f"t{i}"))
                    return
                except ProviderUnavailable as exc:
                    transient += 1
                    timeouts += exc.status is None
                    assert exc.status in (429, 503, None)
            raise AssertionError(f"delivery {i} never landed")

    try:
        await asyncio.gather(*(deliver(i) for i in range(100)))
    finally:
        await fast.aclose()
    assert sorted(fcm.ledger.accepted) == sorted(f"e9:u{i}:push:d1" for i in range(100))
    assert fcm.ledger.repeat_count <= timeouts
    assert transient >= sum(fcm.ledger.failures.values()) > 0


def test_fake_runs_as_its_own_process(tmp_path: Path) -> None:
    from loadtest.fake_ceiling import run_fake_fcm

    credentials = tmp_path / "sa.json"
    with run_fake_fcm(credentials, extra=["--error-rate", "0.5"]) as url:
        stats = httpx.get(f"{url}/_fake/stats", trust_env=False).json()
        assert stats == {"requests": 0, "accepted": 0, "repeats": 0, "missing_key": 0,
                         "failures": {}}
        assert ServiceAccount.from_file(credentials).token_uri == f"{url}/token"


async def test_every_provider_against_the_fake_suite(tmp_path: Path) -> None:
    from tests.fakes.suite import running_fakes

    async with running_fakes(tmp_path) as fakes:
        fakes.set_behaviour(latency=0.01)
        providers = open_providers(Settings(**fakes.settings()))
        try:
            assert providers.unconfigured_channels() == []
            sub = fakes.webpush.subscribe()
            targets = {"fcm": "ftok", "apns": "atok", "webpush": sub.endpoint,
                       "sms": "+15551230009", "email": "kid@example.org"}
            for kind, address in targets.items():
                adapter = providers.for_target(kind)  # type: ignore[arg-type]
                assert adapter is not None
                keys = WebPushKeys(sub.p256dh, sub.auth_b64) if kind == "webpush" else None
                await adapter.send(outgoing(f"e1:u1:{kind}", kind=kind, address=address,
                                            webpush=keys))
        finally:
            await providers.aclose()
        for kind, ledger in fakes.ledgers().items():
            assert list(ledger.accepted) == [f"e1:u1:{kind}"], kind
            assert ledger.missing_key == 0
