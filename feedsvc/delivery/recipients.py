"""Recipients: who can be notified, where, and how they want it.

The first stage of delivery (see DESIGN.md): devices (push targets: FCM and APNs tokens,
Web Push subscriptions), contacts (an email address, an E.164 phone number) and
preferences (per-channel switches, per-kind overrides, locale) of each user, written by
``PUT /v1/users/{u}/devices|contacts|preferences`` (``feedsvc/api/recipients.py``) and read
by the notify fan-out and the channel workers. Stored behind the ``Recipients`` port, with
a Cassandra and an embedded implementation; validation and the preference rules here are
pure.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated, Literal, Protocol
from urllib.parse import urlsplit

import msgspec

from feedsvc.delivery.policy import QuietHours, QuietHoursError, check_quiet_hours
from feedsvc.errors import Unprocessable

Platform = Literal["fcm", "apns", "webpush"]
Channel = Literal["push", "sms", "email"]
CHANNELS: tuple[Channel, ...] = ("push", "sms", "email")
MAX_DEVICES = 20  # per user
MAX_KINDS = 100  # kind overrides per user
DEFAULT_LOCALE = "en"

_EMAIL = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}"
                    r"[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$")
_PHONE = re.compile(r"^\+[1-9][0-9]{1,14}$")  # E.164
_LOCALE = re.compile(r"^[A-Za-z]{2,3}(?:-[A-Za-z0-9]{1,8})*$")  # a BCP 47 tag, loosely
_TOKEN = re.compile(r"^[\x21-\x7e]{1,4096}$")  # printable ASCII, no spaces

Token = Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]


class WebPushKeys(msgspec.Struct, forbid_unknown_fields=True):
    p256dh: str  # base64url of the browser's P-256 public key (65 bytes, uncompressed)
    auth: str  # base64url of the 16-byte authentication secret


class WebPushSubscription(msgspec.Struct, forbid_unknown_fields=True):
    """A browser's ``PushSubscription`` as its ``toJSON()`` gives it (endpoint and keys)."""

    endpoint: Annotated[str, msgspec.Meta(max_length=2048)]
    keys: WebPushKeys


class DeviceIn(msgspec.Struct, forbid_unknown_fields=True):
    """``PUT /v1/users/{u}/devices/{d}``: a token for fcm/apns, a subscription for webpush."""

    platform: Platform
    token: Token | None = None
    subscription: WebPushSubscription | None = None


class Device(msgspec.Struct, frozen=True):
    """A registered device as stored (the push worker's target)."""

    device_id: str
    platform: Platform
    token: str | None = None
    subscription: WebPushSubscription | None = None
    active: bool = True
    deactivated_reason: str | None = None


class DeviceOut(msgspec.Struct):
    device_id: str
    platform: Platform
    active: bool


class DeviceListItem(msgspec.Struct):
    device_id: str
    platform: Platform
    active: bool
    deactivated_reason: str | None


class DeviceList(msgspec.Struct):
    items: list[DeviceListItem]


class ContactsIn(msgspec.Struct, forbid_unknown_fields=True):
    """``PUT /v1/users/{u}/contacts``: a field left out or null removes that address."""

    email: Annotated[str, msgspec.Meta(max_length=254)] | None = None
    phone: Annotated[str, msgspec.Meta(max_length=16)] | None = None


class Contacts(msgspec.Struct, frozen=True):
    email: str | None = None
    phone: str | None = None
    email_active: bool = False
    phone_active: bool = False


class ChannelSwitches(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    push: bool = True
    sms: bool = True
    email: bool = True


class KindSwitches(msgspec.Struct, forbid_unknown_fields=True, frozen=True,
                   omit_defaults=True):
    """Overrides for one event kind; a channel left out follows the channel switch."""

    push: bool | None = None
    sms: bool | None = None
    email: bool | None = None


Kind = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


class PreferencesIn(msgspec.Struct, forbid_unknown_fields=True):
    """``PUT /v1/users/{u}/preferences``; every field optional (defaults fill the rest)."""

    channels: ChannelSwitches | None = None
    kinds: dict[Kind, KindSwitches] | None = None
    locale: Annotated[str, msgspec.Meta(min_length=2, max_length=35)] | None = None
    quiet_hours: QuietHours | None = None  # null or left out: no quiet hours


class Preferences(msgspec.Struct, frozen=True):
    channels: ChannelSwitches = ChannelSwitches()
    kinds: dict[str, KindSwitches] = msgspec.field(default_factory=dict)
    locale: str = DEFAULT_LOCALE
    quiet_hours: QuietHours | None = None


# --- validation (pure) -----------------------------------------------------------------------


def _b64url_bytes(value: str) -> bytes | None:
    if not re.fullmatch(r"[A-Za-z0-9_-]+={0,2}", value):
        return None
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        return None


def device_from(device_id: str, body: DeviceIn) -> Device:
    """Check a registration; a 422 names the field that is wrong."""
    if body.platform == "webpush":
        sub = body.subscription
        if sub is None or body.token is not None:
            raise Unprocessable("a webpush device has a subscription and no token",
                                code="invalid_field", field="subscription")
        try:
            url = urlsplit(sub.endpoint)
            scheme, host = url.scheme, url.hostname
        except ValueError:  # an unbalanced "[", a bad port
            scheme, host = "", None
        if scheme not in ("https", "http") or not host:
            raise Unprocessable("subscription.endpoint must be an http(s) URL",
                                code="invalid_field", field="subscription.endpoint")
        key = _b64url_bytes(sub.keys.p256dh)
        if key is None or len(key) != 65 or key[0] != 4:
            raise Unprocessable("subscription.keys.p256dh must be base64url of an uncompressed "
                                "P-256 public key", code="invalid_field",
                                field="subscription.keys.p256dh")
        secret = _b64url_bytes(sub.keys.auth)
        if secret is None or len(secret) != 16:
            raise Unprocessable("subscription.keys.auth must be base64url of 16 bytes",
                                code="invalid_field", field="subscription.keys.auth")
        return Device(device_id, "webpush", subscription=sub)
    if body.token is None or body.subscription is not None:
        raise Unprocessable(f"a {body.platform} device has a token and no subscription",
                            code="invalid_field", field="token")
    if not _TOKEN.fullmatch(body.token):
        raise Unprocessable("token must be printable ASCII without spaces",
                            code="invalid_field", field="token")
    return Device(device_id, body.platform, token=body.token)


def contacts_from(body: ContactsIn, before: Contacts | None) -> Contacts:
    """The contacts to store. An address is active when set, except one that is the same
    as before and was deactivated (a bounce, an opt-out): registering it again as it was
    does not undo that; a new address does."""
    if body.email is not None and not _EMAIL.fullmatch(body.email):
        raise Unprocessable("email is not an email address", code="invalid_field",
                            field="email")
    if body.phone is not None and not _PHONE.fullmatch(body.phone):
        raise Unprocessable("phone must be an E.164 number (+ and up to 15 digits)",
                            code="invalid_field", field="phone")
    before = before or Contacts()
    email_active = body.email is not None and (
        body.email != before.email or before.email_active)
    phone_active = body.phone is not None and (
        body.phone != before.phone or before.phone_active)
    return Contacts(body.email, body.phone, email_active, phone_active)


def preferences_from(body: PreferencesIn) -> Preferences:
    if body.kinds is not None and len(body.kinds) > MAX_KINDS:
        raise Unprocessable(f"at most {MAX_KINDS} kinds", code="invalid_field", field="kinds")
    if body.locale is not None and not _LOCALE.fullmatch(body.locale):
        raise Unprocessable("locale must be a BCP 47 language tag (en, fr-CA, ...)",
                            code="invalid_field", field="locale")
    if body.quiet_hours is not None:
        try:
            check_quiet_hours(body.quiet_hours)
        except QuietHoursError as exc:
            raise Unprocessable(str(exc), code="invalid_field", field=exc.field) from exc
    return Preferences(channels=body.channels or ChannelSwitches(), kinds=body.kinds or {},
                       locale=body.locale or DEFAULT_LOCALE, quiet_hours=body.quiet_hours)


def channel_allowed(prefs: Preferences, kind: str, channel: Channel) -> bool:
    """A kind override decides where it says something; elsewhere the channel switch."""
    override = prefs.kinds.get(kind)
    said = getattr(override, channel) if override is not None else None
    return bool(getattr(prefs.channels, channel) if said is None else said)


# --- the port ---------------------------------------------------------------------------------


class Recipients(Protocol):
    """Devices, contacts and preferences per user. Every write is an upsert."""

    async def put_device(self, user_id: str, device: Device) -> bool:
        """Register (or re-register: reactivate) a device; False when the user already has
        ``MAX_DEVICES`` other devices (nothing written)."""

    async def delete_device(self, user_id: str, device_id: str) -> None: ...

    async def devices(self, user_id: str) -> list[Device]:
        """Every device of the user, active or not, ordered by device_id."""

    async def deactivate_device(self, user_id: str, device: Device, reason: str) -> None:
        """A dead token: nothing is sent to it until it is registered again. Only if the
        device is still registered with that token (a new registration stays active)."""

    async def put_contacts(self, user_id: str, contacts: Contacts) -> None: ...

    async def contacts(self, user_id: str) -> Contacts | None: ...

    async def put_preferences(self, user_id: str, prefs: Preferences) -> None: ...

    async def preferences(self, user_id: str) -> Preferences | None: ...


def same_target(a: Device, b: Device) -> bool:
    return (a.platform, a.token, a.subscription) == (b.platform, b.token, b.subscription)


def contacts_without(current: Contacts | None, channel: Literal["sms", "email"],
                     address: str) -> Contacts | None:
    """The contacts once ``address`` is known dead on ``channel``; None when nothing
    changes (no contacts, another address on file now, or already inactive)."""
    if current is None:
        return None
    if channel == "email" and current.email == address and current.email_active:
        return msgspec.structs.replace(current, email_active=False)
    if channel == "sms" and current.phone == address and current.phone_active:
        return msgspec.structs.replace(current, phone_active=False)
    return None


async def deactivate_contact(recipients: Recipients, user_id: str,
                             channel: Literal["sms", "email"], address: str) -> None:
    """A hard bounce or an unreachable number: only if ``address`` is still the one on file
    (a new address set meanwhile stays active)."""
    changed = contacts_without(await recipients.contacts(user_id), channel, address)
    if changed is not None:
        await recipients.put_contacts(user_id, changed)
