"""One error tree, sorted by what the caller should do.

::

    FeedError
    ├── ConfigError            bad settings: fail at start, name the variable
    ├── ClientError            the request is wrong: a 4xx, nothing was changed
    │   ├── InvalidRequest         400 (malformed JSON, bad query parameter, bad cursor)
    │   ├── Unauthenticated        401
    │   ├── Forbidden              403
    │   ├── NotFound               404
    │   ├── RequestTimeout         408 (the body did not arrive in time)
    │   ├── PayloadTooLarge        413
    │   ├── UnsupportedMediaType   415 (a JSON route sent something else)
    │   └── Unprocessable          422 (well-formed but rejected: too_old, reused key, ...)
    ├── RetryableError         a dependency is briefly unavailable: back off and retry (503)
    │   └── ProviderUnavailable    a provider call failed transiently (connection error,
    │                              timeout, 5xx, 429): schedule a retry, honouring retry_after
    └── PermanentError         retrying cannot help: dead-letter the work item
        ├── ProviderRejected       the provider refused this message for good (invalid
        │                          payload, bad credentials): dead-letter, no retry
        ├── DeadTarget             the token, number or address can never receive again:
        │                          deactivate the target with ``reason``, no retry
        └── RenderError            a template failed at send time: dead-letter, reason
                                   ``render_error``

Adapters (``store/``, ``queue/``, ``delivery/providers/``) translate driver and wire
exceptions into this tree with ``raise ... from exc``; the API maps the tree to HTTP in one
middleware. A provider adapter's send either returns a receipt (sent) or raises one of the
three provider errors above, so a channel worker decides with one ``except`` per outcome.
"""

from __future__ import annotations


class FeedError(Exception):
    """Base of every error feedsvc raises on purpose."""


class ConfigError(FeedError):
    """A setting is missing or invalid."""


class ClientError(FeedError):
    status = 400
    code = "invalid_request"

    def __init__(self, message: str, *, code: str | None = None, field: str | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.field = field


class InvalidRequest(ClientError):
    status = 400


class Unauthenticated(ClientError):
    status = 401
    code = "unauthenticated"


class Forbidden(ClientError):
    status = 403
    code = "forbidden"


class NotFound(ClientError):
    status = 404
    code = "not_found"


class RequestTimeout(ClientError):
    status = 408
    code = "request_timeout"


class PayloadTooLarge(ClientError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(ClientError):
    status = 415
    code = "unsupported_media_type"


class Unprocessable(ClientError):
    status = 422
    code = "unprocessable"


class RetryableError(FeedError):
    """A store or queue call failed in a way a retry may fix."""


class PermanentError(FeedError):
    """A work item that can never succeed; it goes to the dead-letter stream."""


class ProviderUnavailable(RetryableError):
    """A provider call failed in a way a later attempt may fix (connection error, timeout,
    HTTP 5xx or 429, SMTP 4xx). ``retry_after`` is the provider's own hint in seconds, when
    it gave one (``Retry-After``); the retry schedule waits at least that long."""

    def __init__(self, provider: str, detail: str, *, retry_after: float | None = None,
                 status: int | None = None) -> None:
        super().__init__(f"{provider}: {detail}")
        self.provider = provider
        self.detail = detail
        self.retry_after = retry_after
        self.status = status


class ProviderRejected(PermanentError):
    """The provider refused this message and would refuse it again (invalid payload, bad
    credentials, a 4xx that names no target)."""

    def __init__(self, provider: str, detail: str, *, status: int | None = None) -> None:
        super().__init__(f"{provider}: {detail}")
        self.provider = provider
        self.detail = detail
        self.status = status


class DeadTarget(PermanentError):
    """The target can never receive: an unregistered or malformed device token, an expired
    Web Push subscription, an SMTP hard bounce, a number that cannot take SMS. ``reason`` is
    a short stable word for the device's or contact's ``deactivated_reason``."""

    def __init__(self, provider: str, reason: str, detail: str = "",
                 *, status: int | None = None) -> None:
        super().__init__(f"{provider}: {reason}" + (f" ({detail})" if detail else ""))
        self.provider = provider
        self.reason = reason
        self.detail = detail
        self.status = status


class RenderError(PermanentError):
    """A stored template failed while rendering one recipient's message."""

    reason = "render_error"

    def __init__(self, template: str, locale: str, field: str, detail: str) -> None:
        super().__init__(f"template {template!r} locale {locale} {field}: {detail}")
        self.template = template
        self.locale = locale
        self.field = field
        self.detail = detail
