"""Settings: every ``FEEDSVC_*`` environment variable and its CLI flag, parsed once.

This is the only module that reads the environment. ``Settings`` is frozen and passed
down from the composition root; tests build ``Settings(...)`` directly. A bad value fails
at start with a message naming the variable (``ConfigError``).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from feedsvc.delivery.policy import DEFAULT_NOTIFY_RATE, parse_notify_rate
from feedsvc.errors import ConfigError
from feedsvc.ratelimit import Rate

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text: str) -> float:
    """``"500ms"``, ``"30s"``, ``"5m"``, ``"1h"``, ``"2d"`` or plain seconds -> seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30s, 5m, 1h)")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be >= 0")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be a TCP port (0-65535)")
    return value


def _positive_duration(text: str) -> float:
    value = parse_duration(text)
    if value <= 0:
        raise ValueError("must be a positive duration")
    return value


def _http_url(text: str) -> str:
    if not re.fullmatch(r"https?://[^/\s?#]+(/[^\s?#]*)?", text):
        raise ValueError("must be an http:// or https:// URL")
    return text.rstrip("/")


def _smtp_url(text: str) -> str:
    if not re.fullmatch(r"smtps?://([^@/\s]+@)?[^/\s@?]+(:\d+)?/?(\?[^\s]*)?", text):
        raise ValueError("use smtp://[user:pass@]host:port, smtps://... or ?starttls=true")
    return text


def _channels(text: str) -> tuple[str, ...]:
    channels = _keys(text)
    bad = [c for c in channels if c not in ("push", "sms", "email")]
    if bad:
        raise ValueError(f"unknown channel(s) {', '.join(bad)} (use push, sms, email)")
    return channels


def _webhook_secrets(text: str) -> tuple[tuple[str, str], ...]:
    """``email=whsec_...,fcm=whsec_...``: one Standard Webhooks secret per provider name."""
    out: list[tuple[str, str]] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, sep, secret = part.partition("=")
        if not sep or not re.fullmatch(r"[a-z0-9_-]{1,32}", name):
            raise ValueError("use provider=whsec_<base64>,... (provider: 1-32 of a-z 0-9 _ -)")
        if not re.fullmatch(r"whsec_[A-Za-z0-9+/]+={0,2}", secret) or len(secret) < 30:
            raise ValueError(f"the secret of {name} must be whsec_ and base64 (16+ bytes)")
        out.append((name, secret))
    return tuple(out)


def _hosts(text: str) -> tuple[str, ...]:
    hosts = tuple(h.strip() for h in text.split(",") if h.strip())
    for host in hosts:
        _, sep, port = host.rpartition(":")
        if sep and not port.isdigit():
            raise ValueError(f"bad host:port {host!r}")
    return hosts


def _keys(text: str) -> tuple[str, ...]:
    keys = tuple(k.strip() for k in text.split(",") if k.strip())
    for key in keys:  # a bearer credential's characters (RFC 6750 b64token)
        if not re.fullmatch(r"[A-Za-z0-9._~+/-]+=*", key):
            raise ValueError("keys use only A-Z a-z 0-9 - . _ ~ + / (and trailing =)")
    return keys


def _jwt_secret(text: str) -> str:
    if len(text.encode()) < 32:
        raise ValueError("must be at least 32 bytes (HS256 needs a key as long as its hash)")
    return text


def _keyspace(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,47}", text):
        raise ValueError("must be a Cassandra identifier (letters, digits, _; max 48)")
    return text


def _prefix(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", text):
        raise ValueError("use 1-64 of A-Z a-z 0-9 _ . -")
    return text


def _replication(text: str) -> str:
    pattern = r"(SimpleStrategy:\d+|NetworkTopologyStrategy(:[A-Za-z0-9_-]+=\d+)+)"
    if not re.fullmatch(pattern, text):
        raise ValueError("use SimpleStrategy:RF or NetworkTopologyStrategy:dc1=3:dc2=3")
    return text


CONSISTENCY_LEVELS = ("ONE", "TWO", "THREE", "QUORUM", "ALL", "LOCAL_QUORUM",
                      "EACH_QUORUM", "LOCAL_ONE")
SERIAL_LEVELS = ("SERIAL", "LOCAL_SERIAL")


def _ratio(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise ValueError("must be a share between 0 (exclusive) and 1")
    return value


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("use true or false")


def _log_format(text: str) -> str:
    value = text.strip().lower()
    if value not in ("text", "json"):
        raise ValueError("use text or json")
    return value


def _consistency(text: str) -> str:
    if text.upper() not in CONSISTENCY_LEVELS:
        raise ValueError(f"use one of {', '.join(CONSISTENCY_LEVELS)}")
    return text.upper()


def _serial_consistency(text: str) -> str:
    if text.upper() not in SERIAL_LEVELS:
        raise ValueError(f"use one of {', '.join(SERIAL_LEVELS)}")
    return text.upper()


@dataclass(frozen=True)
class _Var:
    attr: str
    env: str
    parse: Callable[[str], Any]
    help: str


_VARS: tuple[_Var, ...] = (
    _Var("cassandra_hosts", "FEEDSVC_CASSANDRA_HOSTS", _hosts,
         "comma list of host[:port]; unset means the embedded backend"),
    _Var("keyspace", "FEEDSVC_KEYSPACE", _keyspace, "Cassandra keyspace (default feedsvc)"),
    _Var("replication", "FEEDSVC_REPLICATION", _replication,
         "keyspace replication for migrate (default SimpleStrategy:1)"),
    _Var("redis_url", "FEEDSVC_REDIS_URL", str, "Redis URL; unset means the in-process queue"),
    _Var("queue_prefix", "FEEDSVC_QUEUE_PREFIX", _prefix,
         "prefix of every Redis key feedsvc uses (default feedsvc)"),
    _Var("data_dir", "FEEDSVC_DATA_DIR", Path, "embedded backend directory (default ./data)"),
    _Var("host", "FEEDSVC_HOST", str, "listen address (default 127.0.0.1)"),
    _Var("port", "FEEDSVC_PORT", _port, "listen port (default 8080)"),
    _Var("celebrity_threshold", "FEEDSVC_CELEBRITY_THRESHOLD", _non_negative_int,
         "followers at which an author switches to pull (default 10000)"),
    _Var("service_keys", "FEEDSVC_SERVICE_KEYS", _keys, "comma list of accepted service keys"),
    _Var("jwt_secret", "FEEDSVC_JWT_SECRET", _jwt_secret,
         "HS256 secret for user tokens (at least 32 bytes)"),
    _Var("inbox_max", "FEEDSVC_INBOX_MAX", _positive_int, "inbox entries kept (default 800)"),
    _Var("inbox_ttl_days", "FEEDSVC_INBOX_TTL_DAYS", _positive_int,
         "retention in days, from created_at (default 30)"),
    _Var("low_max_age", "FEEDSVC_LOW_MAX_AGE", _positive_duration,
         "low-priority events queued longer are shed (default 1h)"),
    _Var("claim_idle", "FEEDSVC_CLAIM_IDLE", _positive_duration,
         "idle time after which a dead consumer's entries are reclaimed (default 15s)"),
    _Var("sweep_after", "FEEDSVC_SWEEP_AFTER", _positive_duration,
         "an accepted event not fanned out this long after it was queued is queued again "
         "by the outbox sweeper (default 30s)"),
    _Var("request_timeout", "FEEDSVC_REQUEST_TIMEOUT", _positive_duration,
         "a Cassandra or Redis request not answered in this time fails (API: 503) "
         "(default 5s)"),
    _Var("queue_shards", "FEEDSVC_QUEUE_SHARDS", _positive_int,
         "streams per priority in Redis, spread over a cluster's slots (default 1)"),
    _Var("redis_cluster", "FEEDSVC_REDIS_CLUSTER", _bool,
         "FEEDSVC_REDIS_URL names a node of a Redis Cluster (default false)"),
    _Var("consistency", "FEEDSVC_CONSISTENCY", _consistency,
         "Cassandra consistency level of reads and writes (default LOCAL_QUORUM)"),
    _Var("serial_consistency", "FEEDSVC_SERIAL_CONSISTENCY", _serial_consistency,
         "consistency of lightweight transactions (default LOCAL_SERIAL)"),
    _Var("max_pull_authors", "FEEDSVC_MAX_PULL_AUTHORS", _positive_int,
         "celebrities pulled per inbox read (default 100)"),
    _Var("pull_set_ttl", "FEEDSVC_PULL_SET_TTL", parse_duration,
         "how long a process reuses the set of pull authors (default 1s; 0 = every read)"),
    # --- read caches (feedsvc/readcache.py) ---
    _Var("head_ttl", "FEEDSVC_HEAD_TTL", parse_duration,
         "longest a process keeps a celebrity's newest events when no post notice comes "
         "(default 5s; 0 = no head cache)"),
    _Var("following_ttl", "FEEDSVC_FOLLOWING_TTL", parse_duration,
         "longest a process keeps a reader's following list; changes are seen at once "
         "whatever this is (default 60s; 0 = no cache)"),
    _Var("fanout_concurrency", "FEEDSVC_FANOUT_CONCURRENCY", _positive_int,
         "inbox write batches in flight per process (default 32)"),
    _Var("inbox_trim_every", "FEEDSVC_INBOX_TRIM_EVERY", _non_negative_int,
         "one inbox write in N checks the cap (default 0: FEEDSVC_INBOX_MAX / 2)"),
    # --- hostile clients: token lifetime, connection limits ---
    _Var("jwt_max_ttl", "FEEDSVC_JWT_MAX_TTL", _positive_duration,
         "longest accepted user-token lifetime, exp - iat (default 30d)"),
    _Var("header_timeout", "FEEDSVC_HEADER_TIMEOUT", _positive_duration,
         "time a client has to send a request's line and headers (default 10s)"),
    _Var("body_timeout", "FEEDSVC_BODY_TIMEOUT", _positive_duration,
         "time a client has to send a request body (default 30s)"),
    _Var("keepalive_timeout", "FEEDSVC_KEEPALIVE_TIMEOUT", _positive_duration,
         "idle time after which a keep-alive connection is closed (default 75s)"),
    _Var("max_connections", "FEEDSVC_MAX_CONNECTIONS", _positive_int,
         "open client connections per process; past it idle ones are closed (default 1024)"),
    _Var("rate_limit_service", "FEEDSVC_RATE_LIMIT_SERVICE", Rate.parse,
         "requests per service key, e.g. 1000/s (default: no limit)"),
    _Var("rate_limit_user", "FEEDSVC_RATE_LIMIT_USER", Rate.parse,
         "requests per user token's user, e.g. 20/s (default: no limit)"),
    # Notification providers (feedsvc/delivery/providers/): a channel whose provider is not
    # configured suppresses its deliveries with channel_not_configured.
    _Var("fcm_project_id", "FEEDSVC_FCM_PROJECT_ID", str, "Firebase project id (push, FCM)"),
    _Var("fcm_credentials", "FEEDSVC_FCM_CREDENTIALS", Path,
         "path to the FCM service-account JSON file"),
    _Var("fcm_url", "FEEDSVC_FCM_URL", _http_url,
         "FCM base URL (default https://fcm.googleapis.com)"),
    _Var("apns_key_file", "FEEDSVC_APNS_KEY_FILE", Path, "APNs signing key (.p8 file)"),
    _Var("apns_key_id", "FEEDSVC_APNS_KEY_ID", str, "APNs key id"),
    _Var("apns_team_id", "FEEDSVC_APNS_TEAM_ID", str, "Apple developer team id"),
    _Var("apns_topic", "FEEDSVC_APNS_TOPIC", str, "APNs topic (the app's bundle id)"),
    _Var("apns_url", "FEEDSVC_APNS_URL", _http_url,
         "APNs base URL (default https://api.push.apple.com; http:// = HTTP/2 cleartext)"),
    _Var("vapid_private_key", "FEEDSVC_VAPID_PRIVATE_KEY", str,
         "Web Push VAPID key: the raw 32-byte P-256 private key, base64url"),
    _Var("vapid_subject", "FEEDSVC_VAPID_SUBJECT", str,
         "VAPID subject: mailto: or https: contact of the sender"),
    _Var("sms_url", "FEEDSVC_SMS_URL", _http_url,
         "Twilio-compatible SMS base URL (default https://api.twilio.com)"),
    _Var("sms_account_sid", "FEEDSVC_SMS_ACCOUNT_SID", str, "SMS account SID"),
    _Var("sms_auth_token", "FEEDSVC_SMS_AUTH_TOKEN", str, "SMS auth token"),
    _Var("sms_from", "FEEDSVC_SMS_FROM", str, "sending number (E.164) or sender id"),
    _Var("smtp_url", "FEEDSVC_SMTP_URL", _smtp_url,
         "smtp://[user:pass@]host:port, smtps:// for implicit TLS, ?starttls=true"),
    _Var("email_from", "FEEDSVC_EMAIL_FROM", str, "From address of notification emails"),
    _Var("console_channels", "FEEDSVC_CONSOLE_CHANNELS", _channels,
         "channels only logged, not sent (demo; comma list of push, sms, email)"),
    _Var("provider_timeout", "FEEDSVC_PROVIDER_TIMEOUT", _positive_duration,
         "timeout of one provider call (default 10s)"),
    _Var("delivery_max_attempts", "FEEDSVC_DELIVERY_MAX_ATTEMPTS", _positive_int,
         "provider calls per delivery before it is dead-lettered (default 8)"),
    # Provider status webhooks (feedsvc/delivery/status.py).
    _Var("public_url", "FEEDSVC_PUBLIC_URL", _http_url,
         "the service's URL as providers call it (https://feed.example.com), for Twilio "
         "signatures behind a proxy (default: the URL the request arrived at)"),
    _Var("webhook_secrets", "FEEDSVC_WEBHOOK_SECRETS", _webhook_secrets,
         "Standard Webhooks secrets of status callbacks: provider=whsec_...,..."),
    # Delivery policy (feedsvc/delivery/policy.py, breaker.py).
    _Var("notify_rate", "FEEDSVC_NOTIFY_RATE", parse_notify_rate,
         "deliveries per recipient and channel per window; more roll into a digest "
         "(default push=10/1h,sms=3/1h,email=3/1h)"),
    _Var("breaker_failures", "FEEDSVC_BREAKER_FAILURES", _positive_int,
         "consecutive failures that open a provider's circuit breaker (default 5)"),
    _Var("breaker_ratio", "FEEDSVC_BREAKER_RATIO", _ratio,
         "share of failed calls over the window that opens it (default 0.5)"),
    _Var("breaker_window", "FEEDSVC_BREAKER_WINDOW", _positive_duration,
         "the breaker's sliding window (default 60s)"),
    _Var("breaker_cooldown", "FEEDSVC_BREAKER_COOLDOWN", _positive_duration,
         "how long an open breaker fails fast before a probe call (default 30s)"),
    # --- operations: metrics, logs ---
    _Var("metrics_public", "FEEDSVC_METRICS_PUBLIC", _bool,
         "GET /metrics answers without the service key (a scraper on a private network; "
         "default false)"),
    _Var("log_format", "FEEDSVC_LOG_FORMAT", _log_format,
         "text (default, for a terminal) or json (one object per line)"),
    _Var("access_log", "FEEDSVC_ACCESS_LOG", _bool,
         "one log line per HTTP request (default true; benchmarks turn it off)"),
)


@dataclass(frozen=True)
class Settings:
    """Everything configurable, with the defaults the docs promise."""

    cassandra_hosts: tuple[str, ...] = ()
    keyspace: str = "feedsvc"
    replication: str = "SimpleStrategy:1"
    redis_url: str | None = None
    queue_prefix: str = "feedsvc"
    data_dir: Path = field(default_factory=lambda: Path("data"))
    host: str = "127.0.0.1"
    port: int = 8080
    celebrity_threshold: int = 10_000
    service_keys: tuple[str, ...] = ()
    jwt_secret: str | None = None
    inbox_max: int = 800
    inbox_ttl_days: int = 30
    low_max_age: float = 3600.0
    claim_idle: float = 15.0
    sweep_after: float = 30.0
    request_timeout: float = 5.0
    queue_shards: int = 1
    redis_cluster: bool = False
    consistency: str = "LOCAL_QUORUM"
    serial_consistency: str = "LOCAL_SERIAL"
    max_pull_authors: int = 100
    pull_set_ttl: float = 1.0
    # --- read caches ---
    head_ttl: float = 5.0
    following_ttl: float = 60.0
    fanout_concurrency: int = 32
    # One inbox write in N checks the cap (0: inbox_max // 2).
    inbox_trim_every: int = 0
    # --- hostile clients ---
    jwt_max_ttl: float = 30 * 86_400.0
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keepalive_timeout: float = 75.0
    max_connections: int = 1024
    rate_limit_service: Rate | None = None
    rate_limit_user: Rate | None = None
    # Notification providers: unset means that provider is not configured.
    fcm_project_id: str | None = None
    fcm_credentials: Path | None = None
    fcm_url: str = "https://fcm.googleapis.com"
    apns_key_file: Path | None = None
    apns_key_id: str | None = None
    apns_team_id: str | None = None
    apns_topic: str | None = None
    apns_url: str = "https://api.push.apple.com"
    vapid_private_key: str | None = None
    vapid_subject: str | None = None
    sms_url: str = "https://api.twilio.com"
    sms_account_sid: str | None = None
    sms_auth_token: str | None = None
    sms_from: str | None = None
    smtp_url: str | None = None
    email_from: str | None = None
    console_channels: tuple[str, ...] = ()
    provider_timeout: float = 10.0
    delivery_max_attempts: int = 8
    # Provider status webhooks.
    public_url: str | None = None
    webhook_secrets: tuple[tuple[str, str], ...] = ()
    # Delivery policy.
    notify_rate: Mapping[str, Rate] = field(default_factory=lambda: dict(DEFAULT_NOTIFY_RATE),
                                            hash=False)
    breaker_failures: int = 5
    breaker_ratio: float = 0.5
    breaker_window: float = 60.0
    breaker_cooldown: float = 30.0
    # --- operations ---
    metrics_public: bool = False
    log_format: str = "text"
    access_log: bool = True

    @property
    def embedded(self) -> bool:
        return not self.cassandra_hosts

    @property
    def trim_every(self) -> int:
        return self.inbox_trim_every or max(1, self.inbox_max // 2)

    @property
    def retention_ms(self) -> int:
        return self.inbox_ttl_days * 86_400_000

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def load(
        cls, environ: Mapping[str, str], args: argparse.Namespace | None = None
    ) -> Settings:
        """Build from the environment, then CLI flags (flags win). Raises ConfigError."""
        values: dict[str, Any] = {}
        for var in _VARS:
            raw = environ.get(var.env)
            source = var.env
            flag = getattr(args, var.attr, None) if args is not None else None
            if flag is not None:
                raw, source = flag, f"--{var.attr.replace('_', '-')}"
            if raw is None or raw == "":
                continue
            try:
                values[var.attr] = var.parse(raw)
            except ValueError as exc:
                raise ConfigError(f"{source}={raw!r} is invalid: {exc}") from exc
        settings = cls(**values)
        if settings.redis_url and not settings.redis_url.startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ConfigError(f"FEEDSVC_REDIS_URL={settings.redis_url!r} is not a redis:// URL")
        return settings

    def check_backend(self) -> None:
        """Cassandra and Redis go together; the embedded backend uses neither."""
        if self.cassandra_hosts and not self.redis_url:
            raise ConfigError("FEEDSVC_CASSANDRA_HOSTS is set but FEEDSVC_REDIS_URL is not")
        if self.redis_url and not self.cassandra_hosts:
            raise ConfigError("FEEDSVC_REDIS_URL is set but FEEDSVC_CASSANDRA_HOSTS is not")


def add_arguments(parser: argparse.ArgumentParser, only: Sequence[str] | None = None) -> None:
    """Add one ``--flag`` per setting (all strings; parsed by ``Settings.load``)."""
    for var in _VARS:
        if only is not None and var.attr not in only:
            continue
        parser.add_argument(
            f"--{var.attr.replace('_', '-')}", dest=var.attr, default=None,
            metavar=var.env, help=f"{var.help} [env {var.env}]",
        )
