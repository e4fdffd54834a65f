"""Email over SMTP (aiosmtplib): title as subject, body as plain text.

A channel worker calls ``EmailProvider.send`` for an email delivery to the user's address.
``FEEDSVC_SMTP_URL`` is ``smtp://[user:pass@]host:port`` (``?starttls=true`` upgrades the
connection), or ``smtps://`` for implicit TLS. Each send is one SMTP session: simple, and
robust against servers that drop idle connections. ``Message-ID`` is derived from the
delivery key and the message carries an ``Idempotency-Key`` header, so a repeat is
recognisable downstream.

Answers: accepted → sent (the Message-ID is the receipt); a 5xx refusal of the recipient is
a hard bounce (dead address); 4xx answers, timeouts and lost connections retry; other 5xx
answers (sender refused, data refused, authentication) are rejected.
"""

from __future__ import annotations

import logging
from email.message import EmailMessage
from email.utils import formatdate
from urllib.parse import parse_qs, unquote, urlsplit

import aiosmtplib

from feedsvc.delivery.providers.base import IDEMPOTENCY_HEADER, Outgoing, Receipt, key_digest
from feedsvc.errors import ConfigError, DeadTarget, ProviderRejected, ProviderUnavailable

log = logging.getLogger(__name__)


class SmtpServer:
    """Where and how to connect, parsed from FEEDSVC_SMTP_URL."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
            raise ConfigError(f"FEEDSVC_SMTP_URL={url!r}: use smtp:// or smtps://host:port")
        query = {k: v[-1].lower() for k, v in parse_qs(parts.query).items()}
        self.hostname = parts.hostname
        self.use_tls = parts.scheme == "smtps"
        self.start_tls = query.get("starttls") in ("true", "1", "yes")
        if self.use_tls and self.start_tls:
            raise ConfigError(f"FEEDSVC_SMTP_URL={url!r}: smtps:// is TLS already; drop starttls")
        try:
            self.port = parts.port or (465 if self.use_tls else 25)
        except ValueError as exc:
            raise ConfigError(f"FEEDSVC_SMTP_URL={url!r}: bad port") from exc
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None


def message_id(key: str, sender: str) -> str:
    """``<digest@domain>``: the same delivery key always gives the same Message-ID."""
    domain = sender.rpartition("@")[2].strip(">") or "feedsvc.invalid"
    return f"<{key_digest(key)}@{domain}>"


def compose(message: Outgoing, sender: str) -> EmailMessage:
    mail = EmailMessage()
    mail["From"] = sender
    mail["To"] = message.address
    mail["Subject"] = " ".join(message.title.split())  # a header is one line
    mail["Date"] = formatdate(localtime=False, usegmt=True)
    mail["Message-ID"] = message_id(message.key, sender)
    mail["Auto-Submitted"] = "auto-generated"
    mail[IDEMPOTENCY_HEADER] = message.key
    mail.set_content(message.body)
    return mail


class EmailProvider:
    """Sends notification emails through one SMTP server."""

    name = "email"

    def __init__(self, server: SmtpServer, sender: str, *, timeout: float = 10.0) -> None:
        self.server = server
        self.sender = sender
        self.timeout = timeout

    async def send(self, message: Outgoing) -> Receipt:
        try:
            mail = compose(message, self.sender)
        except ValueError as exc:  # an address no header can carry
            raise DeadTarget(self.name, "invalid_address", str(exc)) from exc
        server = self.server
        try:
            await aiosmtplib.send(
                mail, hostname=server.hostname, port=server.port, username=server.username,
                password=server.password, use_tls=server.use_tls, start_tls=server.start_tls,
                timeout=self.timeout)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            refusal = exc.recipients[0]
            raise _refused(refusal.code, refusal.message, recipient=True) from exc
        except aiosmtplib.SMTPResponseException as exc:
            raise _refused(exc.code, exc.message, recipient=False) from exc
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise ProviderUnavailable(self.name, f"{type(exc).__name__}: {exc}") from exc
        return Receipt(self.name, str(mail["Message-ID"]))

    async def aclose(self) -> None:
        """Nothing held between sends."""


def _refused(code: int, text: str, *, recipient: bool) -> Exception:
    detail = f"SMTP {code} {text}".strip()
    if 400 <= code < 500:
        return ProviderUnavailable("email", detail, status=code)
    if recipient and 500 <= code < 600:
        return DeadTarget("email", "hard_bounce", detail, status=code)
    return ProviderRejected("email", detail, status=code)
