"""SMS through a Twilio-compatible REST API: ``POST {url}/2010-04-01/Accounts/{sid}/
Messages.json``, form ``To``, ``From``, ``Body``, HTTP basic auth (account SID, token).

A channel worker calls ``SmsProvider.send`` for an sms delivery to the user's phone. The
title and body are joined into one text. Answers: 200/201 ``{"sid"}`` sent; Twilio error
codes 21211 (invalid number), 21610 (recipient opted out), 21614 (not a mobile number)
dead number; 429 / 5xx retry; any other 4xx rejected.
"""

from __future__ import annotations

import logging

from feedsvc.delivery.providers import http
from feedsvc.delivery.providers.base import IDEMPOTENCY_HEADER, Outgoing, Receipt
from feedsvc.errors import DeadTarget, ProviderRejected

log = logging.getLogger(__name__)

DEAD_CODES = {21211: "invalid_number", 21610: "unsubscribed", 21614: "not_mobile"}


def sms_text(title: str, body: str) -> str:
    """One SMS text from a title and a body (either may be empty)."""
    return f"{title}: {body}" if title and body else title or body


class SmsProvider:
    """Sends text messages through a Twilio-compatible API."""

    name = "sms"

    def __init__(self, account_sid: str, auth_token: str, sender: str,
                 client: http.HttpClient, base_url: str = "https://api.twilio.com") -> None:
        self.client = client
        self.auth = (account_sid, auth_token)
        self.sender = sender
        self.url = f"{base_url.rstrip('/')}/2010-04-01/Accounts/{account_sid}/Messages.json"

    async def send(self, message: Outgoing) -> Receipt:
        form = {"To": message.address, "From": self.sender,
                "Body": sms_text(message.title, message.body)}
        answer = await self.client.request(
            self.name, "POST", self.url, headers={IDEMPOTENCY_HEADER: message.key}, form=form,
            basic_auth=self.auth)
        status = answer.status
        reply = answer.json()
        if status in (200, 201):
            return Receipt(self.name, str(reply.get("sid", "")))
        code = reply.get("code")
        text = f"HTTP {status} code {code} {reply.get('message', '')}".strip()
        if isinstance(code, int) and code in DEAD_CODES:
            raise DeadTarget(self.name, DEAD_CODES[code], text, status=status)
        if http.is_transient(status):
            raise http.unavailable(self.name, answer, f"code {code}")
        raise ProviderRejected(self.name, text, status=status)

    async def aclose(self) -> None:
        """Nothing of its own: the HTTP client is shared and closed by its owner."""
