"""What the servers need from the machine: Debian packages, a JDK 11/17, Maven.

Installs only when run as root on a system with apt-get; otherwise it stops with a message
naming the package to install.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from .settings import ServiceError, say

SUPPORTED_JAVA_MAJORS = (11, 17)

_apt_updated = False


def is_root() -> bool:
    return os.geteuid() == 0


def apt_install(packages: Sequence[str], reason: str) -> None:
    """Install Debian packages when running as root; otherwise explain what to install."""
    global _apt_updated
    names = " ".join(packages)
    if not is_root() or shutil.which("apt-get") is None:
        raise ServiceError(
            f"{reason}. Install it first, e.g. `sudo apt-get install -y {names}` "
            "(or your platform's equivalent), then run this command again."
        )
    say(f"{reason}; installing {names} with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    apt = ["apt-get", "-o", "DPkg::Lock::Timeout=300"]
    out = sys.stderr.fileno()
    # A policy-rc.d that answers 101 stops the package's own init/systemd service from being
    # started while installing (Debian's redis-server would otherwise run on port 6379). Ours
    # is a separate process with its own port, config and data, so that instance never matters;
    # this merely avoids leaving an unused server behind. An existing policy-rc.d is left alone.
    policy = Path("/usr/sbin/policy-rc.d")
    placed_policy = False
    if not policy.exists():
        with contextlib.suppress(OSError):
            policy.write_text("#!/bin/sh\n# temporary, placed by feedsvc services.py\nexit 101\n")
            policy.chmod(0o755)
            placed_policy = True
    try:
        if not _apt_updated:
            subprocess.run([*apt, "update"], env=env, stdout=out, check=True)
            _apt_updated = True
        subprocess.run(
            [*apt, "install", "-y", "--no-install-recommends", *packages],
            env=env,
            stdout=out,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        raise ServiceError(f"apt-get could not install {names}: {exc}") from exc
    finally:
        if placed_policy:
            policy.unlink(missing_ok=True)


def find_program(name: str, package: str, reason: str) -> str:
    """``name`` on PATH or in /usr/bin, installing ``package`` with apt when missing."""
    for candidate in (shutil.which(name), f"/usr/bin/{name}"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    apt_install([package], reason)
    found = shutil.which(name) or f"/usr/bin/{name}"
    if not os.access(found, os.X_OK):
        raise ServiceError(f"{name} is still missing after installing {package}")
    return found


def redis_server_binary() -> str:
    return find_program("redis-server", "redis-server", "redis-server is not installed")


def redis_cli_binary() -> str:
    """``redis-cli`` creates the Redis Cluster (Debian: redis-tools, which redis-server
    depends on)."""
    return find_program("redis-cli", "redis-tools", "redis-cli is not installed")


def browser_binaries() -> tuple[str, str]:
    """Debian's ``chromium`` and ``chromium-driver`` (the status page's browser test drives
    them with selenium); installed with apt when missing. Never a downloaded browser."""
    chromium = find_program("chromium", "chromium", "chromium is not installed")
    driver = find_program("chromedriver", "chromium-driver", "chromedriver is not installed")
    return chromium, driver


def java_major_version(java: str) -> int | None:
    try:
        result = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', result.stderr + result.stdout)
    if match is None:
        return None
    major = int(match.group(1))
    if major == 1 and match.group(2):  # "1.8.0_..." style
        major = int(match.group(2))
    return major


def java_candidates() -> list[str]:
    candidates: list[str] = []
    java_home = os.environ.get("JAVA_HOME", "").strip()
    if java_home:
        candidates.append(str(Path(java_home) / "bin" / "java"))
    on_path = shutil.which("java")
    if on_path:
        candidates.append(on_path)
    jvm_root = Path("/usr/lib/jvm")
    if jvm_root.is_dir():
        candidates.extend(str(path) for path in sorted(jvm_root.glob("*/bin/java"), reverse=True))
    unique: list[str] = []
    seen: set[str] = set()
    for candidate in candidates:
        resolved = os.path.realpath(candidate)
        if resolved not in seen and os.access(resolved, os.X_OK):
            seen.add(resolved)
            unique.append(candidate)
    return unique


def find_java() -> str:
    wrong: list[str] = []
    for attempt in range(2):
        for candidate in java_candidates():
            major = java_major_version(candidate)
            if major in SUPPORTED_JAVA_MAJORS:
                return candidate
            wrong.append(f"{candidate} (Java {major if major is not None else '?'})")
        if attempt == 0:
            found = "; found " + ", ".join(wrong) if wrong else ""
            apt_install(
                ["openjdk-17-jre-headless"],
                f"Cassandra 5.0 needs Java 11 or 17 and none was found{found}",
            )
    raise ServiceError("no Java 11 or 17 found even after installing openjdk-17-jre-headless")


def java_home_of(java: str) -> Path:
    return Path(os.path.realpath(java)).parent.parent


def find_maven() -> str:
    found = shutil.which("mvn")
    if found:
        return found
    apt_install(["maven"], "Maven (mvn) is needed once to fetch the Cassandra jars")
    found = shutil.which("mvn")
    if not found:
        raise ServiceError("mvn is still missing after installing maven")
    return found
