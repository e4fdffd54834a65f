"""Turn a benchmark result (``loadtest.bench``) into a markdown table and PNG charts."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}" if value >= 100 else f"{value:,.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    parts = [f"## feedsvc benchmark ({'quick' if result['quick'] else 'full'} run, "
             f"{result['started']}, {result['seconds']} s)",
             f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, "
             f"{result['machine']['memory_gib']} GiB, Python {result['machine']['python']}."]
    noop_rps = 0.0
    if "ceilings" in result:
        noop_rps = result["ceilings"]["aiohttp_noop"]["rps"]
        wrk = result["ceilings"].get("aiohttp_noop_wrk")
        if wrk and any(s.get("client") == "wrk" for s in result.get("strategies", [])):
            noop_rps = wrk["rps"]  # reads measured by wrk are compared with wrk's no-op
        parts += _ceilings(result["ceilings"])
    if "fanout" in result:
        parts += _fanout(result["fanout"])
    if "latency" in result:
        parts += _latency(result["latency"])
    if "strategies" in result:
        parts += _strategies(result["strategies"], noop_rps)
    if result.get("read_ratios"):
        parts += _read_ratios(result["read_ratios"])
    if "locust" in result:
        parts += _locust(result["locust"])
    return "\n\n".join(parts) + "\n"


def _ceilings(c: dict[str, Any]) -> list[str]:
    best = c["cassandra"]["best"]
    noop = c["aiohttp_noop"]
    parts = ["### Ceilings of this machine"]
    runs = c["cassandra"].get("runs", {})
    rows = [[f"Cassandra insert, {name}", f"{rate:,.0f} rows/s" + (
                f" ({runs[name]['errors']} failed requests: not a candidate)"
                if runs.get(name, {}).get("errors") else "")]
            for name, rate in c["cassandra"]["patterns"].items()]
    rows.append(["Cassandra insert, best", f"{best['rows_per_s']:,.0f} rows/s ({best['pattern']})"])
    rows += [[f"Redis {name}", f"{rate:,.0f} ops/s"] for name, rate in c["redis"].items()
             if isinstance(rate, (int, float))]
    rows.append(["aiohttp no-op handler", f"{noop['rps']:,.0f} req/s "
                 f"(p50 {noop['p50_ms']:.2f} ms, p99 {noop['p99_ms']:.2f} ms)"])
    wrk = c.get("aiohttp_noop_wrk")
    if wrk:
        rows.append(["aiohttp no-op handler, wrk", f"{wrk['rps']:,.0f} req/s "
                     f"(p50 {wrk['p50_ms']:.2f} ms, p99 {wrk['p99_ms']:.2f} ms)"])
    if c.get("cassandra_read"):
        rows += _read_ceiling_rows(c["cassandra_read"], "")
    parts.append(_table(["ceiling", "measured"], rows))
    return parts


def _read_ceiling_rows(read: dict[str, Any], where: str) -> list[list[Any]]:
    return [[f"Cassandra inbox slice read{where}, {name}",
             f"{r['queries_per_s']:,.0f} reads/s ({r['rows_per_s']:,.0f} rows/s, "
             f"p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms)"]
            for name, r in read["patterns"].items()]


def _rounds(fanout: dict[str, Any] | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per worker count; results from before repeated rounds were a plain list of one
    round each."""
    if isinstance(fanout, list):  # its ratios were to the sweep's fastest pattern: left out
        return [{**{k: v for k, v in r.items() if not k.startswith("ratio")},
                 "rounds": [r["rows_per_s"]]} for r in fanout]
    rounds: list[dict[str, Any]] = fanout["rounds"]
    return rounds


def _fanout(fanout: dict[str, Any] | list[dict[str, Any]]) -> list[str]:
    rounds = _rounds(fanout)
    ceiling = fanout.get("ceiling") if isinstance(fanout, dict) else None
    parts = ["### Fan-out throughput (HTTP in, Cassandra inbox rows out)"]
    if ceiling:
        runs = ", ".join(f"{rate:,.0f}" for rate in ceiling["runs"])
        parts.append(f"Ceiling: the best insert pattern ({ceiling['pattern']}), in the sweep "
                     "and again before every fan-out round (runs without errors): "
                     f"{runs} rows/s; median {ceiling['median_rows_per_s']:,}, fastest "
                     f"{ceiling['fastest_rows_per_s']:,}.")
    parts.append(_table(
        ["worker processes", "events", "inbox rows", "rounds, rows/s", "median rows/s",
         "ratio to ceiling (median)", "ratio to its fastest run", "machine busy"],
        [[r["workers"], r["events"], r["rows"], ", ".join(f"{x:,}" for x in r["rounds"]),
          r["rows_per_s"],
          f"{r['ratio_to_ceiling']:.0%}" if "ratio_to_ceiling" in r else "-",
          f"{r['ratio_to_fastest_ceiling_run']:.0%}"
          if "ratio_to_fastest_ceiling_run" in r else "-",
          f"{r['machine_busy_pct']}%" if r.get("machine_busy_pct") is not None else "-"]
         for r in rounds]))
    return parts


def _latency(latency: dict[str, list[dict[str, Any]]]) -> list[str]:
    rows = []
    for label, entries in latency.items():
        rows += [[label, r["followers"], r["samples"], r["p50_ms"], r["p99_ms"], r["max_ms"]]
                 for r in entries]
    return ["### Delivery latency (202 -> readable in the last follower's inbox)",
            _table(["system", "followers", "samples", "p50 ms", "p99 ms", "max ms"], rows)]


def _strategies(strategies: list[dict[str, Any]], noop_rps: float) -> list[str]:
    parts = ["### Strategies on the same graph and events"]
    rows = []
    for s in strategies:
        reads = {r["celebrities"]: r for r in s["reads"]}
        rows.append([s["strategy"], s["rows_per_event"],
                     f"{s['mega_fanout_s']:.2f} s ({s['mega_rows']:,} rows)",
                     *(f"{reads[k]['p50_ms']:.1f} / {reads[k]['p99_ms']:.1f}"
                       for k in (0, 3, 30))])
    mega = strategies[0]["mega_followers"] if strategies else 0
    parts.append(_table(
        ["strategy", "rows per event", f"fan-out of one {mega:,}-follower post",
         "inbox p50/p99 ms, 0 celebrities", "3 celebrities", "30 celebrities"], rows))
    read_rows = [[s["strategy"], r["celebrities"], r["rps"],
                  f"{r['rps'] / noop_rps:.0%}" if noop_rps else "-", r["errors"]]
                 for s in strategies for r in s["reads"]]
    parts.append(_table(["strategy", "celebrities followed", "GET /v1/inbox req/s",
                         "ratio to no-op handler", "errors"], read_rows))
    by_processes = [s for s in strategies if "reads_by_processes" in s]
    if by_processes:
        client = by_processes[0].get("client", "httpload")
        parts.append(f"GET /v1/inbox?limit=50 by API processes ({client}, 16 connections):")
        rows = []
        for s in by_processes:
            for count, reads in s["reads_by_processes"].items():
                rows += [[s["strategy"], count, r["celebrities"], r["rps"], r["p50_ms"],
                          r["p99_ms"], r["errors"]] for r in reads]
        parts.append(_table(["strategy", "API processes", "celebrities followed", "req/s",
                             "p50 ms", "p99 ms", "errors"], rows))
    ceiling = next((s["read_ceiling"] for s in strategies if "read_ceiling" in s), None)
    if ceiling:
        parts.append(_table(["raw read ceiling on the push readers' inboxes", "measured"],
                            _read_ceiling_rows(ceiling, ", push inboxes")))
    return parts


_TARGETS = [
    ("hybrid inbox req/s ÷ pure push, 3 celebrities", "hybrid_rps_over_push_3c", ">= 0.9"),
    ("hybrid inbox req/s ÷ pure push, 30 celebrities", "hybrid_rps_over_push_30c", ">= 0.7"),
    ("hybrid p99 ÷ pure push p99, 3 celebrities", "hybrid_p99_over_push_3c", "<= 1.3"),
    ("hybrid p99 ÷ pure push p99, 30 celebrities", "hybrid_p99_over_push_30c", "<= 1.5"),
]


def _read_ratios(ratios: dict[str, Any]) -> list[str]:
    rows = []
    for label, key, target in _TARGETS:
        rows.append([label, *(ratios.get(f"{key}_{n}p", "-") for n in (1, 2)), target])
    rows.append(["push-reader req/s ÷ raw read ceiling (best of 1 and 2)",
                 ratios.get("push_rps_over_read_ceiling_1p", "-"),
                 ratios.get("push_rps_over_read_ceiling_2p", "-"), ">= 0.6 (best: "
                 f"{ratios.get('push_rps_over_read_ceiling', '-')})"])
    for strategy in ("hybrid", "push", "pull"):
        for group in (0, 3, 30):
            key = f"{strategy}_{group}c_processes_2_over_1"
            if key in ratios:
                rows.append([f"{strategy}, {group} celebrities: req/s with --processes 2 ÷ 1",
                             "", ratios[key], ">= 1.5"])
    return ["### Read targets (ratios of this run)",
            _table(["figure", "API 1 process", "API 2 processes", "target"], rows)]


def _locust(lo: dict[str, Any]) -> list[str]:
    entries = [*lo["endpoints"], lo["total"]] if lo["total"] else lo["endpoints"]
    return [f"### locust mixed workload ({lo['users']} users, {lo['duration_s']} s)", _table(
        ["endpoint", "requests", "failures", "req/s", "p50 ms", "p95 ms", "p99 ms"],
        [[e["name"], e["requests"], e["failures"], e["rps"], e["p50_ms"], e["p95_ms"],
          e["p99_ms"]] for e in entries])]


def charts(result: dict[str, Any], out: Path, name: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: list[Path] = []
    if "fanout" in result and "ceilings" in result:
        paths.append(_throughput_chart(plt, result, out, name))
    if "latency" in result:
        paths.append(_latency_chart(plt, result, out, name))
    if "strategies" in result:
        paths.append(_reads_chart(plt, result, out, name))
    return paths


def _throughput_chart(plt: Any, result: dict[str, Any], out: Path, name: str) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    rounds = _rounds(result["fanout"])
    workers = [r["workers"] for r in rounds]
    ax.plot(workers, [r["rows_per_s"] for r in rounds], marker="o",
            label="feedsvc fan-out (median)")
    for r in rounds:
        ax.scatter([r["workers"]] * len(r["rounds"]), r["rounds"], color="C0", alpha=0.35, s=12)
    ceiling = result["fanout"].get("ceiling") if isinstance(result["fanout"], dict) else None
    ax.axhline(ceiling["median_rows_per_s"] if ceiling else
               result["ceilings"]["cassandra"]["best"]["rows_per_s"], color="grey",
               linestyle="--", label="raw insert ceiling" + (" (median)" if ceiling else ""))
    if ceiling:
        ax.axhline(ceiling["fastest_rows_per_s"], color="grey", linestyle=":",
                   label="raw insert ceiling (fastest run)")
    ax.set_xlabel("worker processes")
    ax.set_ylabel("inbox rows / s")
    ax.set_xticks(workers)
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.set_title("Fan-out throughput")
    return _save(plt, fig, out / f"{name}-throughput.png")


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _latency_chart(plt: Any, result: dict[str, Any], out: Path, name: str) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    labels: list[str] = []
    p50: list[float] = []
    p99: list[float] = []
    for label, entries in result["latency"].items():
        for r in entries:
            labels.append(f"{r['followers']:,}\n{label}")
            p50.append(r["p50_ms"])
            p99.append(r["p99_ms"])
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], p50, width=0.4, label="p50")
    ax.bar([x + 0.2 for x in xs], p99, width=0.4, label="p99")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("ms from 202 to visible in the last inbox")
    ax.set_xlabel("followers / system")
    ax.legend()
    ax.set_title("Delivery latency")
    return _save(plt, fig, out / f"{name}-latency.png")


def _reads_chart(plt: Any, result: dict[str, Any], out: Path, name: str) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    groups = (0, 3, 30)
    for i, s in enumerate(result["strategies"]):
        reads = {r["celebrities"]: r for r in s["reads"]}
        ax.bar([g + i * 0.27 for g in range(3)], [reads[k]["p99_ms"] for k in groups],
               width=0.27, label=f"{s['strategy']} p99")
    ax.set_xticks([g + 0.27 for g in range(3)], [f"{k} celebrities" for k in groups])
    ax.set_ylabel("GET /v1/inbox p99 ms")
    ax.legend()
    ax.set_title("Read latency by strategy")
    return _save(plt, fig, out / f"{name}-reads.png")


def write_report(result: dict[str, Any], out: Path, name: str) -> str:
    text = markdown(result)
    (out / f"{name}.md").write_text(text)
    charts(result, out, name)
    return text
