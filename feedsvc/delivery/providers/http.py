"""What the HTTP provider adapters share: one client port, its two implementations, the
transport-error map, and Retry-After.

Sits under ``fcm.py``, ``apns.py``, ``webpush.py`` and ``sms.py``. The adapters speak to an
``HttpClient`` and read an ``Answer`` (status, headers, body), so which library carries the
bytes is decided here, once:

* ``AiohttpClient`` (``open_client``): one per process, shared by FCM, Web Push and SMS.
  HTTP/1.1 with keep-alive. aiohttp rather than httpx because httpcore's connection pool
  spends CPU per request in proportion to its open connections: with 8 to 64 in flight it
  sent 3 to 7 times fewer requests than aiohttp to the same fake
  (``python -m loadtest.fake_ceiling --client httpx`` compares).
* ``HttpxClient`` (``open_http2_client``): HTTP/2 only, for APNs, which speaks nothing else;
  on an ``http://`` URL it uses HTTP/2 with prior knowledge. One connection carries every
  stream, so the pool cost above does not arise.

Both translate every transport failure (connect, read, timeout, protocol) into
``ProviderUnavailable``; the adapters sort the answers.
"""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import httpx

from feedsvc.errors import ProviderUnavailable

# Connections kept per client: enough for the channel workers' bounded concurrency.
MAX_CONNECTIONS = 256
# Retry-After values above this are capped: a provider's hint, not a reason to park a
# delivery for a day.
MAX_RETRY_AFTER = 3600.0


@dataclass(frozen=True)
class Answer:
    """A provider's HTTP answer. ``headers`` is case-insensitive."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> dict[str, Any]:
        """The JSON object of the body, or {} when it has none."""
        try:
            value = json.loads(self.body)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


class HttpClient(Protocol):
    async def request(self, provider: str, method: str, url: str, *,
                      headers: Mapping[str, str], json_body: Any = None,
                      form: Mapping[str, str] | None = None, content: bytes | None = None,
                      basic_auth: tuple[str, str] | None = None) -> Answer:
        """One request; a transport failure raises ProviderUnavailable."""
        ...

    async def aclose(self) -> None: ...


class AiohttpClient:
    """HTTP/1.1 keep-alive client; the session is opened on first use (inside the loop)."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                # trust_env would look up ~/.netrc and the proxy variables on a thread for
                # every request (two executor hops each): provider calls go direct.
                trust_env=False)
        return self._session

    async def request(self, provider: str, method: str, url: str, *,
                      headers: Mapping[str, str], json_body: Any = None,
                      form: Mapping[str, str] | None = None, content: bytes | None = None,
                      basic_auth: tuple[str, str] | None = None) -> Answer:
        send_headers = dict(headers)
        data: Any = content
        if json_body is not None:
            data = json.dumps(json_body, separators=(",", ":")).encode()
            send_headers["Content-Type"] = "application/json"
        elif form is not None:
            data = dict(form)  # aiohttp sends a dict urlencoded
        if basic_auth is not None:
            send_headers["Authorization"] = aiohttp.encode_basic_auth(*basic_auth)
        try:
            async with self._open().request(method, url, headers=send_headers, data=data,
                                            allow_redirects=False) as response:
                body = await response.read()
                return Answer(response.status, response.headers, body)
        except TimeoutError as exc:
            raise ProviderUnavailable(provider, "timeout") from exc
        except aiohttp.ClientError as exc:
            raise ProviderUnavailable(provider, f"{type(exc).__name__}: {exc}") from exc

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class HttpxClient:
    """HTTP/2-only client (prior knowledge on ``http://``), for APNs."""

    def __init__(self, timeout: float) -> None:
        limits = httpx.Limits(max_connections=MAX_CONNECTIONS,
                              max_keepalive_connections=MAX_CONNECTIONS)
        # Direct, as the aiohttp session: proxy variables are not used.
        self.client = httpx.AsyncClient(http1=False, http2=True, timeout=httpx.Timeout(timeout),
                                        limits=limits, follow_redirects=False, trust_env=False)

    async def request(self, provider: str, method: str, url: str, *,
                      headers: Mapping[str, str], json_body: Any = None,
                      form: Mapping[str, str] | None = None, content: bytes | None = None,
                      basic_auth: tuple[str, str] | None = None) -> Answer:
        try:
            response = await self.client.request(
                method, url, headers=dict(headers), json=json_body,
                data=dict(form) if form is not None else None, content=content,
                auth=httpx.BasicAuth(*basic_auth) if basic_auth else None)
        except httpx.TimeoutException as exc:
            raise ProviderUnavailable(provider, f"timeout: {type(exc).__name__}") from exc
        except httpx.TransportError as exc:  # connect, read, write, protocol errors
            raise ProviderUnavailable(provider, f"{type(exc).__name__}: {exc}") from exc
        return Answer(response.status_code, response.headers, response.content)

    async def aclose(self) -> None:
        await self.client.aclose()


def open_client(timeout: float) -> AiohttpClient:
    """The shared client of FCM, Web Push and SMS. Close with ``aclose``."""
    return AiohttpClient(timeout)


def open_http2_client(timeout: float) -> HttpxClient:
    """An HTTP/2-only client (APNs). Close with ``aclose``."""
    return HttpxClient(timeout)


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


def unavailable(provider: str, answer: Answer, detail: str = "") -> ProviderUnavailable:
    """The retryable error for a 429/5xx answer, carrying its Retry-After."""
    text = f"HTTP {answer.status}" + (f" {detail}" if detail else "")
    return ProviderUnavailable(provider, text,
                               retry_after=parse_retry_after(answer.headers.get("retry-after")),
                               status=answer.status)


