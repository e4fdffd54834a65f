"""On the local cluster only (``make test-cluster``): a Cassandra node SIGKILLed for 60 s
and a Redis primary SIGKILLed (its replica takes over) under a steady posting and reading
load, with every (user, event) pair counted afterwards. Prints the figures; deselected
unless ``FEEDSVC_REDIS_CLUSTER=true`` (the single-node suite has ``make chaos``)."""

from __future__ import annotations

import argparse

import pytest

from loadtest import chaos


@pytest.mark.cluster
@pytest.mark.timeout(1500)
async def test_node_and_primary_faults_lose_and_duplicate_nothing(
        capsys: pytest.CaptureFixture[str]) -> None:
    args = argparse.Namespace(cluster=True, scenarios="cassandra-node,redis-primary",
                              posts=400, rate=20.0)
    rows = await chaos.run_all(args)
    with capsys.disabled():
        print("\n" + chaos.table(rows))
    for row in rows:
        assert (row["lost"], row["duplicated"], row["5xx_not_503"]) == (0, 0, 0), row
        assert row["exited"] == [], row  # no process ended on its own
        assert row["accepted"] == args.posts, row  # clients retry: everything accepted
