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
    └── PermanentError         retrying cannot help: dead-letter the work item

Adapters (``store/``, ``queue/``) translate driver exceptions into ``RetryableError`` with
``raise ... from exc``; the API maps the tree to HTTP in one middleware.
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
