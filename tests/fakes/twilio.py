"""Fake Twilio-compatible SMS API: ``POST /2010-04-01/Accounts/{sid}/Messages.json``.

Checks HTTP basic auth (account SID and auth token) and the form (``To``, ``From``,
``Body``), and answers as Twilio does: 201 ``{"sid", "status": "queued", ...}``; 400 with
Twilio's error ``code`` for numbers in ``dead_numbers`` (21211 invalid, 21610 unsubscribed,
21614 not mobile); 401 code 20003; 429 code 20429 / 503 with Retry-After.
"""

from __future__ import annotations

import base64
import secrets

from aiohttp import web

from tests.fakes.ledger import Behaviour, pause, retry_headers
from tests.fakes.web import HttpFake

ACCOUNT_SID = "AC" + "0f" * 16
AUTH_TOKEN = "fake-auth-token"
FROM = "+15005550006"


def twilio_error(status: int, code: int, message: str,
                 headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"code": code, "message": message, "status": status,
                              "more_info": f"https://www.twilio.com/docs/errors/{code}"},
                             status=status, headers=headers)


class FakeTwilio(HttpFake):
    def __init__(self, behaviour: Behaviour | None = None) -> None:
        super().__init__(behaviour)
        self.dead_numbers: dict[str, int] = {}  # number -> Twilio error code

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/2010-04-01/Accounts/{sid}/Messages.json", self.messages)

    async def messages(self, request: web.Request) -> web.Response:
        expected = "Basic " + base64.b64encode(f"{ACCOUNT_SID}:{AUTH_TOKEN}".encode()).decode()
        if request.headers.get("Authorization") != expected \
                or request.match_info["sid"] != ACCOUNT_SID:
            return twilio_error(401, 20003, "Authenticate")
        form = await request.post()
        to, sender, body = (str(form.get(name, "")) for name in ("To", "From", "Body"))
        if not to:
            return twilio_error(400, 21604, "A 'To' phone number is required.")
        if not sender:
            return twilio_error(400, 21603, "A 'From' phone number is required.")
        if not body:
            return twilio_error(400, 21602, "Message body is required.")
        decision = self.ledger.decide(self.behaviour, request.headers.get("Idempotency-Key"), to)
        await pause(self.behaviour, decision)
        if decision.outcome == "missing_key":
            return twilio_error(400, 20001, "Idempotency-Key missing")
        if decision.outcome == "duplicate":
            return web.json_response({"sid": decision.message_id, "status": "queued"},
                                     status=201)
        if decision.outcome in ("scripted", "error", "hang"):
            status = decision.status
            code = {429: 20429, 400: 21617}.get(status, 20500)
            return twilio_error(status, code, "injected failure",
                                retry_headers(self.behaviour, status))
        if decision.outcome == "dead" or to in self.dead_numbers:
            code = self.dead_numbers.get(to, 21211)
            return twilio_error(400, code, f"The 'To' number {to} cannot receive messages.")
        key = request.headers["Idempotency-Key"]
        sid = "SM" + secrets.token_hex(16)
        self.ledger.accept(key, {"to": to, "from": sender, "body": body})
        self.ledger.message_ids[key] = sid
        return web.json_response({"sid": sid, "status": "queued", "to": to, "from": sender,
                                  "body": body, "account_sid": ACCOUNT_SID}, status=201)
