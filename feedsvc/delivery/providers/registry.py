"""Build the configured provider adapters from Settings: ``open_providers(settings)``.

The composition root (API/worker start-up) calls this once per process and hands the
``Providers`` to the channel workers, which ask ``for_target(kind)`` per delivery. A target
whose adapter is not configured gets None: the worker suppresses the delivery with
``channel_not_configured``. ``unconfigured_channels`` names the channels with no adapter at
all, for the one warning at start. A half-configured provider (some of its variables set,
others missing) is a ConfigError naming what is missing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from feedsvc.config import Settings
from feedsvc.delivery.providers import http
from feedsvc.delivery.providers.apns import ApnsProvider, read_key
from feedsvc.delivery.providers.base import CHANNEL_OF, Channel, Provider, TargetKind
from feedsvc.delivery.providers.console import ConsoleProvider
from feedsvc.delivery.providers.email import EmailProvider, SmtpServer
from feedsvc.delivery.providers.fcm import FcmProvider, ServiceAccount
from feedsvc.delivery.providers.sms import SmsProvider
from feedsvc.delivery.providers.webpush import WebPushProvider, load_vapid
from feedsvc.errors import ConfigError

log = logging.getLogger(__name__)

CHANNELS: tuple[Channel, ...] = ("push", "sms", "email")


class Providers:
    """The adapters of one process, by target kind, and the HTTP client they share."""

    def __init__(self, adapters: dict[TargetKind, Provider],
                 client: http.HttpClient | None = None) -> None:
        self.adapters = adapters
        self.client = client

    def for_target(self, kind: TargetKind) -> Provider | None:
        """The adapter that sends to this kind of target, or None (not configured)."""
        return self.adapters.get(kind)

    def unconfigured_channels(self) -> list[Channel]:
        configured = {CHANNEL_OF[kind] for kind in self.adapters}
        return [c for c in CHANNELS if c not in configured]

    def warn_unconfigured(self) -> None:
        """One warning per channel that has no provider (called once at start)."""
        for channel in self.unconfigured_channels():
            log.warning("channel %s has no provider configured: its deliveries are "
                        "suppressed (channel_not_configured)", channel)

    async def aclose(self) -> None:
        seen: set[int] = set()
        for adapter in self.adapters.values():
            if id(adapter) not in seen:
                seen.add(id(adapter))
                await adapter.aclose()
        if self.client is not None:
            await self.client.aclose()


def _require(settings: Settings, what: str, names: Iterable[tuple[str, str]]) -> bool:
    """True when all of a provider's settings are set, False when none are; ConfigError
    naming the missing ones when only some are."""
    values = {env: getattr(settings, attr) for attr, env in names}
    missing = [env for env, value in values.items() if value in (None, "")]
    if len(missing) == len(values):
        return False
    if missing:
        raise ConfigError(f"{what} is half configured: set {', '.join(missing)}")
    return True


def open_providers(settings: Settings) -> Providers:
    """Every provider the settings configure. Reads and checks every key file first (fail
    at start, before anything is opened); connects nothing until the first send. Close with
    ``await providers.aclose()``."""
    fcm = apns = vapid = smtp = None
    if _require(settings, "FCM", [("fcm_project_id", "FEEDSVC_FCM_PROJECT_ID"),
                                  ("fcm_credentials", "FEEDSVC_FCM_CREDENTIALS")]):
        assert settings.fcm_project_id and settings.fcm_credentials
        fcm = (settings.fcm_project_id, ServiceAccount.from_file(settings.fcm_credentials))
    if _require(settings, "APNs", [("apns_key_file", "FEEDSVC_APNS_KEY_FILE"),
                                   ("apns_key_id", "FEEDSVC_APNS_KEY_ID"),
                                   ("apns_team_id", "FEEDSVC_APNS_TEAM_ID"),
                                   ("apns_topic", "FEEDSVC_APNS_TOPIC")]):
        assert settings.apns_key_file and settings.apns_key_id
        assert settings.apns_team_id and settings.apns_topic
        apns = (read_key(settings.apns_key_file), settings.apns_key_id, settings.apns_team_id,
                settings.apns_topic)
    if _require(settings, "Web Push", [("vapid_private_key", "FEEDSVC_VAPID_PRIVATE_KEY"),
                                       ("vapid_subject", "FEEDSVC_VAPID_SUBJECT")]):
        assert settings.vapid_private_key and settings.vapid_subject
        vapid = load_vapid(settings.vapid_private_key, settings.vapid_subject)
    sms = _require(settings, "SMS", [("sms_account_sid", "FEEDSVC_SMS_ACCOUNT_SID"),
                                     ("sms_auth_token", "FEEDSVC_SMS_AUTH_TOKEN"),
                                     ("sms_from", "FEEDSVC_SMS_FROM")])
    if _require(settings, "email", [("smtp_url", "FEEDSVC_SMTP_URL"),
                                    ("email_from", "FEEDSVC_EMAIL_FROM")]):
        assert settings.smtp_url
        smtp = SmtpServer(settings.smtp_url)

    adapters: dict[TargetKind, Provider] = {}
    client = (http.open_client(settings.provider_timeout)
              if fcm or vapid or sms else None)
    if fcm is not None and client is not None:
        adapters["fcm"] = FcmProvider(fcm[0], fcm[1], client, settings.fcm_url)
    if apns is not None:
        adapters["apns"] = ApnsProvider(*apns, settings.apns_url,
                                        timeout=settings.provider_timeout)
    if vapid is not None and client is not None and settings.vapid_subject:
        adapters["webpush"] = WebPushProvider(vapid, settings.vapid_subject, client)
    if sms and client is not None:
        assert settings.sms_account_sid and settings.sms_auth_token and settings.sms_from
        adapters["sms"] = SmsProvider(settings.sms_account_sid, settings.sms_auth_token,
                                      settings.sms_from, client, settings.sms_url)
    if smtp is not None and settings.email_from:
        adapters["email"] = EmailProvider(smtp, settings.email_from,
                                          timeout=settings.provider_timeout)
    # The console stands in for every target of a channel it is asked to log.
    console = ConsoleProvider()
    for kind, channel in CHANNEL_OF.items():
        if channel in settings.console_channels:
            adapters[kind] = console
    return Providers(adapters, client)
