"""A real SMTP server (aiosmtpd) that records what it accepts and refuses chosen recipients.

Recipients in ``behaviour.dead`` are refused at ``RCPT`` with ``550 5.1.1`` (a hard bounce);
scripted and random failures answer ``RCPT`` with that status (4xx: try later, 5xx: refused);
``hang`` holds the ``RCPT`` answer. ``DATA`` is recorded per ``Idempotency-Key`` header: a
repeat of an accepted key is answered ``250`` and counted as a repeat only. aiosmtpd runs its
own event loop on a thread, so starting and stopping go through ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from email import message_from_bytes, policy
from typing import Any

from aiosmtpd.controller import Controller

from tests.fakes.ledger import Behaviour, Ledger, free_port

SMTP_TEXT = {421: "4.3.0 service not available", 450: "4.2.1 mailbox busy",
             451: "4.3.0 try again later", 550: "5.1.1 user unknown",
             552: "5.2.2 mailbox full", 554: "5.7.1 rejected"}


class FakeSmtp:
    def __init__(self, behaviour: Behaviour | None = None) -> None:
        self.behaviour = behaviour or Behaviour(error_statuses=(451,))
        self.ledger = Ledger()
        self.host = "127.0.0.1"
        self.port = 0

    @property
    def url(self) -> str:
        return f"smtp://{self.host}:{self.port}"

    @asynccontextmanager
    async def running(self) -> AsyncIterator[FakeSmtp]:
        self.port = free_port()
        controller = Controller(_Handler(self), hostname=self.host, port=self.port)
        await asyncio.to_thread(controller.start)
        try:
            yield self
        finally:
            await asyncio.to_thread(controller.stop)


class _Handler:
    def __init__(self, fake: FakeSmtp) -> None:
        self.fake = fake

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        fake = self.fake
        # The key is in the message, not seen yet: failures are decided on the recipient
        # here (under a key of its own), the request is counted and de-duplicated at DATA.
        decision = fake.ledger.decide(fake.behaviour, f"rcpt:{address}", address, count=False)
        if decision.outcome == "hang":
            await asyncio.sleep(fake.behaviour.hang)
            return "421 4.3.0 timed out"
        if decision.outcome in ("scripted", "error"):
            return f"{decision.status} {SMTP_TEXT.get(decision.status, 'failure')}"
        if decision.outcome == "dead":
            fake.ledger.failures[550] += 1
            return f"550 5.1.1 <{address}>: user unknown"
        if fake.behaviour.latency:
            await asyncio.sleep(fake.behaviour.latency)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        fake = self.fake
        mail = message_from_bytes(envelope.content, policy=policy.default)
        key = str(mail.get("Idempotency-Key") or "")
        decision = fake.ledger.decide(Behaviour(), key, "")
        if decision.outcome == "missing_key":
            return "554 5.6.0 Idempotency-Key header missing"
        if decision.outcome == "duplicate":
            return "250 OK duplicate"
        body = mail.get_body(("plain",))
        fake.ledger.accept(key, {
            "from": envelope.mail_from, "to": list(envelope.rcpt_tos),
            "subject": str(mail["Subject"]), "message_id": str(mail["Message-ID"]),
            "body": body.get_content() if body is not None else "",
        })
        return "250 OK queued"
