"""What the HTTP provider adapters share: the client, the transport-error map, Retry-After.

Sits under ``fcm.py``, ``apns.py``, ``webpush.py`` and ``sms.py``. One ``httpx.AsyncClient``
per process serves FCM, Web Push and SMS (HTTP/2 where the server offers it, HTTP/1.1
otherwise); APNs gets its own HTTP/2-only client because Apple speaks nothing else and an
``http://`` APNs URL means HTTP/2 with prior knowledge. ``request`` translates every
transport failure into ``ProviderUnavailable`` in one place.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping
from typing import Any

import httpx

from feedsvc.errors import ProviderUnavailable

# Connections kept per client: enough for the channel workers' bounded concurrency.
MAX_CONNECTIONS = 256
# Retry-After values above this are capped: a provider's hint, not a reason to park a
# delivery for a day.
MAX_RETRY_AFTER = 3600.0


def open_client(timeout: float, *, http2_only: bool = False) -> httpx.AsyncClient:
    """A client for provider calls. ``http2_only`` speaks HTTP/2 even on ``http://`` URLs
    (prior knowledge), as a local APNs stand-in needs."""
    limits = httpx.Limits(max_connections=MAX_CONNECTIONS,
                          max_keepalive_connections=MAX_CONNECTIONS)
    return httpx.AsyncClient(
        http1=not http2_only, http2=True, timeout=httpx.Timeout(timeout), limits=limits,
        follow_redirects=False,  # trust_env stays on: HTTPS_PROXY / NO_PROXY are honoured
    )


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds to wait: delta-seconds or an HTTP-date; None if absent or
    unreadable; capped at MAX_RETRY_AFTER."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    if text.isdigit():
        return min(float(text), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    delta = when.timestamp() - (time.time() if now is None else now)
    return min(max(delta, 0.0), MAX_RETRY_AFTER)


def is_transient(status: int) -> bool:
    """5xx and 429 are worth retrying; every other non-2xx is the provider's final word."""
    return status == 429 or status >= 500


def unavailable(provider: str, response: httpx.Response, detail: str = "") -> ProviderUnavailable:
    """The retryable error for a 429/5xx answer, carrying its Retry-After."""
    text = f"HTTP {response.status_code}" + (f" {detail}" if detail else "")
    return ProviderUnavailable(
        provider, text, retry_after=parse_retry_after(response.headers.get("retry-after")),
        status=response.status_code)


async def request(
    client: httpx.AsyncClient, provider: str, method: str, url: str, *,
    headers: Mapping[str, str], **kwargs: Any,
) -> httpx.Response:
    """Send one request; a connection error or timeout becomes ProviderUnavailable."""
    try:
        return await client.request(method, url, headers=dict(headers), **kwargs)
    except httpx.TimeoutException as exc:
        raise ProviderUnavailable(provider, f"timeout: {type(exc).__name__}") from exc
    except httpx.TransportError as exc:  # connect, read, write, protocol errors
        raise ProviderUnavailable(provider, f"{type(exc).__name__}: {exc}") from exc


def json_or_empty(response: httpx.Response) -> dict[str, Any]:
    """The JSON object of an error answer, or {} when it has none."""
    try:
        value = response.json()
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
