"""The wrk driver's pure parts (``loadtest/wrk.py``): its Lua script and its report parser."""

from __future__ import annotations

from loadtest.wrk import parse, script

REPORT = """Running 10s test @ http://127.0.0.1:8080
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.20ms  300.00us  12.00ms   90.00%
    Req/Sec    13.10k   500.00    14.00k    70.00%
  Latency Distribution
     50%  810.00us
     75%    1.10ms
     90%    1.50ms
     99%    2.31ms
  130417 requests in 10.00s, 20.15MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  13041.70
Transfer/sec:      2.01MB
"""


def test_parse_reads_rate_percentiles_and_errors() -> None:
    out = parse(REPORT)
    assert out == {"rps": 13041.7, "requests": 130417, "p50_ms": 0.81, "p99_ms": 2.31,
                   "errors": 7}


def test_parse_seconds_and_no_errors() -> None:
    text = REPORT.replace("2.31ms", "1.50s").replace(
        "  Socket errors: connect 0, read 2, write 0, timeout 1\n", "").replace(
        "  Non-2xx or 3xx responses: 4\n", "")
    out = parse(text)
    assert (out["p99_ms"], out["errors"]) == (1500.0, 0)


def test_script_cycles_over_requests_with_quoted_headers() -> None:
    lua = script([("/v1/inbox?limit=50", {"Authorization": 'Bearer a"b'}),
                  ("/v1/inbox", {})])
    assert '{"/v1/inbox?limit=50", {["Authorization"] = "Bearer a\\"b"}},' in lua
    assert '{"/v1/inbox", {}},' in lua
    assert "request = function()" in lua and "wrk.format('GET'" in lua
