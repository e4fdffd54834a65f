"""Cassandra's jars from Maven Central, fetched once into the cache and shared by every node.

``cassandra-all`` and its run-time dependencies are resolved by Maven
(``dependency:copy-dependencies`` on ``scripts/cassandra-pom/pom.xml``, where the version is
pinned) into a temporary directory of the cache, then renamed into place, so that a
half-finished download is never used. A lock file keeps concurrent runs from fetching twice.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from xml.etree import ElementTree

from .install import find_maven, java_home_of
from .process import file_lock, log_excerpt
from .settings import SCRIPTS_DIR, ServiceError, say

CASSANDRA_POM = SCRIPTS_DIR / "cassandra-pom" / "pom.xml"


def cassandra_version() -> str:
    """The version pinned in scripts/cassandra-pom/pom.xml (the only place it is written)."""
    try:
        root = ElementTree.parse(CASSANDRA_POM).getroot()
    except (OSError, ElementTree.ParseError) as exc:
        raise ServiceError(f"cannot read {CASSANDRA_POM}: {exc}") from exc
    namespace = root.tag.partition("}")[0] + "}" if root.tag.startswith("{") else ""
    node = root.find(f"{namespace}properties/{namespace}cassandra.version")
    if node is None or not (node.text or "").strip():
        raise ServiceError(f"{CASSANDRA_POM} has no <cassandra.version> property")
    return (node.text or "").strip()


def ensure_jars(cache: Path, java: str, fetch_log: Path) -> Path:
    """The ``lib`` directory holding every jar the daemon needs; fetched on first use, with
    Maven's output in ``fetch_log``."""
    version = cassandra_version()
    final = cache / f"cassandra-{version}"
    lib = final / "lib"
    marker = f"cassandra-all-{version}.jar"
    if (lib / marker).is_file():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    with file_lock(cache / f"cassandra-{version}.lock", "jar download"):
        if (lib / marker).is_file():  # fetched by a concurrent run while we waited
            return lib
        mvn = find_maven()
        say(f"fetching cassandra-all {version} and its dependencies with Maven into {lib}")
        say(f"(one-time download, tens of MB; Maven output goes to {fetch_log})")
        started = time.monotonic()
        staging = Path(tempfile.mkdtemp(prefix=f".cassandra-{version}-", dir=cache))
        try:
            cmd = [
                mvn,
                "-B",
                "-ntp",
                "-f",
                str(CASSANDRA_POM),
                f"-Dfeedsvc.lib.dir={staging / 'lib'}",
                f"-Dfeedsvc.build.dir={staging / 'target'}",
                "dependency:copy-dependencies",
            ]
            env = dict(os.environ, JAVA_HOME=str(java_home_of(java)))
            fetch_log.parent.mkdir(parents=True, exist_ok=True)
            with fetch_log.open("wb") as log:
                result = subprocess.run(
                    cmd, stdout=log, stderr=subprocess.STDOUT, env=env, check=False
                )
            if result.returncode != 0 or not (staging / "lib" / marker).is_file():
                raise ServiceError(
                    f"Maven could not fetch the Cassandra jars (exit {result.returncode})\n"
                    + log_excerpt(fetch_log)
                )
            shutil.rmtree(staging / "target", ignore_errors=True)
            if final.exists():  # an incomplete leftover from an older layout or a crash
                shutil.rmtree(final)
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        jars = list(lib.glob("*.jar"))
        size_mb = sum(jar.stat().st_size for jar in jars) / 1e6
        say(f"fetched {len(jars)} jars ({size_mb:.0f} MB) in {time.monotonic() - started:.1f}s")
    return lib
