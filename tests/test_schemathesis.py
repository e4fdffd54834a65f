"""A bounded schemathesis run in the gate: the embedded service, every check and phase,
seeded, with a service key and with a user token, must show zero failures. The long run is
``make fuzz`` (``tests/fuzz/run.py``)."""

from __future__ import annotations

from pathlib import Path

from tests.fuzz.run import fuzz

EXAMPLES = 4  # per operation and phase; the coverage phase adds its own boundary cases


def test_schemathesis_finds_nothing(tmp_path: Path) -> None:
    results = fuzz(["embedded"], EXAMPLES, seed=1, work=tmp_path)
    assert [r.auth for r in results] == ["service key", "user token"]
    for result in results:
        assert result.cases > 100, result.summary
        assert result.returncode == 0, result.output[-6000:]
