"""Fuzz the running API with schemathesis against its own OpenAPI document.

Starts ``feedsvc serve`` (embedded backend, or Cassandra + Redis from ``FEEDSVC_CASSANDRA_HOSTS``
/ ``FEEDSVC_REDIS_URL`` in a fresh keyspace), then runs ``schemathesis run`` with every check
and every phase (coverage, fuzzing, stateful), seeded, once with a service key and once with
a user token, and prints the counts. ``make test`` runs a small bounded pass on the embedded
backend (``tests/test_schemathesis.py``); ``make fuzz`` runs ``python -m tests.fuzz.run``
with 1,000 examples per operation on both backends. Exit status 1 if any run found a
failure.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = Path(__file__).with_name("schemathesis.toml")
SERVICE_KEY = "fuzz-service-key"
JWT_SECRET = "fuzz-jwt-secret-0123456789abcdef-0123456789"
_CASES = re.compile(r"(\d+) generated")


@dataclass(frozen=True)
class Result:
    backend: str
    auth: str
    examples: int
    returncode: int
    cases: int
    summary: str
    output: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


@contextlib.contextmanager
def serving(backend: str, data_dir: Path, log: Path) -> Iterator[str]:
    """``feedsvc serve`` on a free port until the block ends; yields its base URL."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEEDSVC_")}
    env.update(FEEDSVC_PORT=str(port), FEEDSVC_DATA_DIR=str(data_dir),
               FEEDSVC_SERVICE_KEYS=SERVICE_KEY, FEEDSVC_JWT_SECRET=JWT_SECRET)
    if backend == "cassandra":
        tag = uuid.uuid4().hex[:10]
        env.update(FEEDSVC_CASSANDRA_HOSTS=os.environ["FEEDSVC_CASSANDRA_HOSTS"],
                   FEEDSVC_REDIS_URL=os.environ["FEEDSVC_REDIS_URL"],
                   FEEDSVC_KEYSPACE=f"feedsvc_fuzz_{tag}", FEEDSVC_QUEUE_PREFIX=f"fuzz{tag}")
        subprocess.run([_bin("feedsvc"), "migrate"], env=env, check=True, timeout=600,
                       stdout=subprocess.DEVNULL)
    with log.open("wb") as out:
        server = subprocess.Popen([_bin("feedsvc"), "serve", "--workers", "1"], env=env,
                                  stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"feedsvc serve did not start; see {log}") from None
                time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        if backend == "cassandra":
            with contextlib.suppress(Exception):
                _drop_keyspace(env["FEEDSVC_CASSANDRA_HOSTS"], env["FEEDSVC_KEYSPACE"])


def _drop_keyspace(hosts: str, keyspace: str) -> None:
    from feedsvc.store.cassandra import connect_cluster

    cluster, session = connect_cluster(tuple(hosts.split(",")))
    try:
        session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}", timeout=120)
    finally:
        cluster.shutdown()


def user_token() -> str:
    from feedsvc.auth import issue_token

    return issue_token(JWT_SECRET, "fuzz-user", ttl_s=6 * 3600)


def run_schemathesis(url: str, backend: str, auth: str, examples: int, seed: int,
                     work: Path) -> Result:
    """One schemathesis run; it keeps its caches under ``work``, not in the repository."""
    credential = SERVICE_KEY if auth == "service key" else user_token()
    command = [_bin("schemathesis"), "--config-file", str(CONFIG), "--no-color", "run",
               f"{url}/openapi.json", "-H", f"Authorization: Bearer {credential}",
               "--max-examples", str(examples), "--seed", str(seed)]
    cwd = work / auth.replace(" ", "-")
    cwd.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(command, capture_output=True, text=True, cwd=cwd, check=False)
    output = done.stdout + done.stderr
    counts = _CASES.findall(output)
    summary = next((line.strip() for line in reversed(output.splitlines())
                    if "generated" in line), "no summary")
    return Result(backend, auth, examples, done.returncode,
                  int(counts[-1]) if counts else 0, summary, output)


def fuzz(backends: list[str], examples: int, seed: int, work: Path) -> list[Result]:
    results = []
    for backend in backends:
        data = work / f"data-{backend}"
        data.mkdir(parents=True, exist_ok=True)
        with serving(backend, data, work / f"serve-{backend}.log") as url, \
                ThreadPoolExecutor(2) as pool:  # both credentials at once
            runs = [pool.submit(run_schemathesis, url, backend, auth, examples, seed, work)
                    for auth in ("service key", "user token")]
            for run in runs:
                result = run.result()
                (work / f"schemathesis-{backend}-{result.auth.replace(' ', '-')}.log"
                 ).write_text(result.output)
                results.append(result)
                print(f"{backend:9} {result.auth:11} max-examples/operation={examples} "
                      f"exit={result.returncode} {result.summary}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--examples", type=int, default=1000,
                        help="schemathesis --max-examples per operation")
    parser.add_argument("--backends", default="embedded,cassandra")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--work", type=Path, default=None,
                        help="where the logs go (default: a new temporary directory)")
    args = parser.parse_args(argv)
    args.work = args.work or Path(tempfile.mkdtemp(prefix="feedsvc-fuzz-"))
    results = fuzz(args.backends.split(","), args.examples, args.seed, args.work)
    failed = [r for r in results if r.returncode != 0]
    print(f"{len(results)} runs, {sum(r.cases for r in results)} cases, "
          f"{len(failed)} with failures (logs in {args.work})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
