"""HTTP load with ``wrk`` (Debian package ``wrk``): a load generator in C that takes a small
share of a core, so that on this two-core machine the server, not the client, sets the
rate. ``loadtest.httpload`` (Python, about a core at full speed) stays the harness's own
generator; the benchmark reports both where it reports a ceiling.

``run_wrk(base_url, requests, connections=16, duration_s=10)`` cycles over ``requests``
(path and headers each), one wrk thread, and returns requests/s, p50, p99 and errors (socket
errors plus answers other than 2xx/3xx) from wrk's ``--latency`` report. Bounded in time;
all traffic goes to ``base_url`` (127.0.0.1 in the harness).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from typing import Any

Request = tuple[str, dict[str, str]]  # path with query, headers

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def wrk_binary() -> str | None:
    """Path of wrk; installs Debian's ``wrk`` when missing and root (None if it cannot)."""
    found = shutil.which("wrk")
    if found is None and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which(
            "apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "--no-install-recommends", "wrk"]
        if subprocess.run(install, env=env, check=False, timeout=600,
                          capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update"], env=env, check=False, timeout=600,
                           capture_output=True)
            subprocess.run(install, env=env, check=False, timeout=600, capture_output=True)
        found = shutil.which("wrk")
    return found


def _lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def script(requests: Sequence[Request]) -> str:
    """A wrk Lua script that sends ``requests`` in turn (each thread from its own start)."""
    entries = []
    for path, headers in requests:
        fields = ", ".join(f"[{_lua_string(k)}] = {_lua_string(v)}" for k, v in headers.items())
        entries.append(f"  {{{_lua_string(path)}, {{{fields}}}}},")
    return "\n".join([
        "local specs = {", *entries, "}",
        "local built = {}",
        "local i = 0",
        "init = function(args)",
        "  for n, spec in ipairs(specs) do built[n] = wrk.format('GET', spec[1], spec[2]) end",
        "end",
        "request = function()",
        "  i = i % #built + 1",
        "  return built[i]",
        "end",
        "",
    ])


def _ms(value: str, unit: str) -> float:
    return float(value) * _UNITS_MS[unit]


def parse(output: str) -> dict[str, Any]:
    """requests/s, p50/p99 ms and errors from ``wrk --latency`` output."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    total = re.search(r"(\d+) requests in", output)
    if rps is None or total is None:
        raise RuntimeError(f"wrk printed no result: {output.strip()[:500]}")
    latency = {pct: _ms(v, u) for pct, v, u in re.findall(
        r"^\s+(\d+)%\s+([\d.]+)(us|ms|s|m)\s*$", output, re.MULTILINE)}
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                       output)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = (sum(int(g) for g in socket.groups()) if socket else 0) + (
        int(bad.group(1)) if bad else 0)
    return {"rps": float(rps.group(1)), "requests": int(total.group(1)),
            "p50_ms": latency.get("50", 0.0), "p99_ms": latency.get("99", 0.0),
            "errors": errors}


def run_wrk(base_url: str, requests: Sequence[Request], *, connections: int = 16,
            duration_s: float = 10.0, threads: int = 1) -> dict[str, Any]:
    binary = wrk_binary()
    if binary is None:
        raise RuntimeError("wrk not found (Debian package wrk)")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script(requests))
        path = f.name
    try:
        done = subprocess.run(
            [binary, "-t", str(threads), "-c", str(connections),
             "-d", f"{max(1, round(duration_s))}s", "--timeout", "10s", "--latency",
             "-s", path, base_url],
            capture_output=True, text=True, check=False, timeout=duration_s + 60)
    finally:
        os.unlink(path)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip()[:500]}")
    out = parse(done.stdout)
    out.update(client="wrk", connections=connections, duration_s=duration_s)
    return out
