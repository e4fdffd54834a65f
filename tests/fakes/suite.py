"""Every fake provider at once, and the settings that point feedsvc at them.

``async with running_fakes(tmp_path) as fakes:`` starts FCM, APNs, Web Push, Twilio and
SMTP fakes on free loopback ports, writes the FCM service account and the APNs key under
``tmp_path``, and closes everything after. ``fakes.settings()`` is the ``Settings`` keyword
arguments that configure every provider against them (``Settings(**fakes.settings())``);
``fakes.ledgers()`` maps each target kind to its fake's ledger.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.fakes import apns as apns_fake
from tests.fakes import twilio as twilio_fake
from tests.fakes.apns import FakeApns
from tests.fakes.fcm import FakeFcm
from tests.fakes.ledger import Behaviour, Ledger
from tests.fakes.smtp import FakeSmtp
from tests.fakes.twilio import FakeTwilio
from tests.fakes.webpush import FakeWebPush, new_vapid_key

EMAIL_FROM = "Feed <notify@feed.example>"
VAPID_SUBJECT = "mailto:ops@feed.example"


@dataclass
class Fakes:
    fcm: FakeFcm
    apns: FakeApns
    webpush: FakeWebPush
    twilio: FakeTwilio
    smtp: FakeSmtp
    credentials: Path
    apns_key: Path
    vapid_private_key: str

    def settings(self) -> dict[str, Any]:
        return {
            "fcm_project_id": self.fcm.project, "fcm_credentials": self.credentials,
            "fcm_url": self.fcm.url,
            "apns_key_file": self.apns_key, "apns_key_id": apns_fake.KEY_ID,
            "apns_team_id": apns_fake.TEAM_ID, "apns_topic": self.apns.topic,
            "apns_url": self.apns.url,
            "vapid_private_key": self.vapid_private_key, "vapid_subject": VAPID_SUBJECT,
            "sms_url": self.twilio.url, "sms_account_sid": twilio_fake.ACCOUNT_SID,
            "sms_auth_token": twilio_fake.AUTH_TOKEN, "sms_from": twilio_fake.FROM,
            "smtp_url": self.smtp.url, "email_from": EMAIL_FROM,
        }

    def ledgers(self) -> dict[str, Ledger]:
        return {"fcm": self.fcm.ledger, "apns": self.apns.ledger,
                "webpush": self.webpush.ledger, "sms": self.twilio.ledger,
                "email": self.smtp.ledger}

    def set_behaviour(self, **fields: Any) -> None:
        """The same misbehaviour on every fake (each gets its own random stream); SMTP's
        errors are 451 (try later) where HTTP fakes answer 503/429."""
        for fake in (self.fcm, self.apns, self.webpush, self.twilio):
            fake.behaviour = Behaviour(**fields)
        self.smtp.behaviour = Behaviour(**{**fields, "error_statuses": (451,)})


@asynccontextmanager
async def running_fakes(directory: Path) -> AsyncIterator[Fakes]:
    vapid_private, vapid_public = new_vapid_key()
    async with AsyncExitStack() as stack:
        fcm = await stack.enter_async_context(FakeFcm().running())
        apns = await stack.enter_async_context(FakeApns().running())
        webpush = await stack.enter_async_context(
            FakeWebPush(application_server_key=vapid_public).running())
        twilio = await stack.enter_async_context(FakeTwilio().running())
        smtp = await stack.enter_async_context(FakeSmtp().running())
        yield Fakes(fcm, apns, webpush, twilio, smtp,
                    credentials=fcm.write_credentials(directory / "fcm-service-account.json"),
                    apns_key=apns.write_key(directory / "apns.p8"),
                    vapid_private_key=vapid_private)
