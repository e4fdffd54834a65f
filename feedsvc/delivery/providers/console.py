"""The ``log`` provider: a delivery is written to the log instead of being sent.

For the demo and for channels an operator wants to watch without a real provider
(``FEEDSVC_CONSOLE_CHANNELS``). It always succeeds; the receipt names the delivery key.
"""

from __future__ import annotations

import logging

from feedsvc.delivery.providers.base import Outgoing, Receipt

log = logging.getLogger(__name__)


class ConsoleProvider:
    """Logs one line per delivery at INFO."""

    name = "log"

    def __init__(self) -> None:
        self.sent = 0

    async def send(self, message: Outgoing) -> Receipt:
        self.sent += 1
        log.info("notification %s to %s %s: %s | %s", message.key, message.kind,
                 message.address, message.title, message.body)
        return Receipt(self.name, f"log:{message.key}")

    async def aclose(self) -> None:
        """Nothing to close."""
