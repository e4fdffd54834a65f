"""Real feedsvc processes for the operations tests: ``feedsvc api`` / ``serve`` / ``worker
--metrics-port`` started on free ports with a test runtime's settings, their logs in files,
stopped (SIGTERM, then SIGKILL) at the end; and reading their ``/metrics``."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from feedsvc.config import Settings
from tests.conftest import JWT_SECRET, SERVICE_KEY


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def process_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a feedsvc process on ``settings``' backend and namespace."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEEDSVC_")}
    env.update({
        "FEEDSVC_DATA_DIR": str(settings.data_dir),
        "FEEDSVC_KEYSPACE": settings.keyspace,
        "FEEDSVC_QUEUE_PREFIX": settings.queue_prefix,
        "FEEDSVC_CLAIM_IDLE": str(settings.claim_idle),
        "FEEDSVC_CELEBRITY_THRESHOLD": str(settings.celebrity_threshold),
        "FEEDSVC_SERVICE_KEYS": SERVICE_KEY,
        "FEEDSVC_JWT_SECRET": JWT_SECRET,
    })
    if not settings.embedded:
        env["FEEDSVC_CASSANDRA_HOSTS"] = ",".join(settings.cassandra_hosts)
        env["FEEDSVC_REDIS_URL"] = settings.redis_url or ""
        env["FEEDSVC_REDIS_CLUSTER"] = str(settings.redis_cluster).lower()
        env["FEEDSVC_QUEUE_SHARDS"] = str(settings.queue_shards)
    env.update(extra)
    return env


@dataclass
class Running:
    process: subprocess.Popen[bytes]
    url: str  # where it answers HTTP (the API, or the worker's metrics)
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def wait_answers(running: Running, path: str = "/healthz", timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(running.url + path, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers (401 included)
        except OSError:
            if running.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{running.url} never answered:\n"
                                     f"{running.log_text()[-4000:]}") from None
            time.sleep(0.2)


@contextlib.contextmanager
def feedsvc(command: list[str], env: dict[str, str], log: Path, port: int) -> Iterator[Running]:
    """``feedsvc COMMAND`` until the block ends; it answers HTTP on ``port`` when yielded."""
    with log.open("ab") as out:
        process = subprocess.Popen([sys.executable, "-m", "feedsvc.cli", *command], env=env,
                                   stdout=out, stderr=subprocess.STDOUT)
    running = Running(process, f"http://127.0.0.1:{port}", log)
    try:
        wait_answers(running)
        yield running
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def get(url: str, credential: str | None = SERVICE_KEY) -> tuple[int, bytes, str]:
    """(status, body, content type) of a GET."""
    request = urllib.request.Request(url)
    if credential is not None:
        request.add_header("Authorization", f"Bearer {credential}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read(), response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers.get("Content-Type", "")


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(base_url: str) -> tuple[str, Samples]:
    """``GET /metrics`` with the service key: the text and its samples by (name, labels)."""
    status, body, content_type = get(base_url + "/metrics")
    assert status == 200, body[:500]
    assert content_type.startswith("text/plain"), content_type
    text = body.decode()
    return text, parse(text)


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and want <= have)
