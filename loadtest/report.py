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
    c = result["ceilings"]
    best = c["cassandra"]["best"]
    noop = c["aiohttp_noop"]
    parts = [f"## feedsvc benchmark ({'quick' if result['quick'] else 'full'} run, "
             f"{result['started']}, {result['seconds']} s)",
             f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, "
             f"{result['machine']['memory_gib']} GiB, Python {result['machine']['python']}."]
    parts.append("### Ceilings of this machine")
    rows = [[f"Cassandra insert, {name}", f"{rate:,.0f} rows/s"]
            for name, rate in c["cassandra"]["patterns"].items()]
    rows.append(["Cassandra insert, best", f"{best['rows_per_s']:,.0f} rows/s ({best['pattern']})"])
    rows += [[f"Redis {name}", f"{rate:,.0f} ops/s"] for name, rate in c["redis"].items()
             if isinstance(rate, (int, float))]
    rows.append(["aiohttp no-op handler", f"{noop['rps']:,.0f} req/s "
                 f"(p50 {noop['p50_ms']:.2f} ms, p99 {noop['p99_ms']:.2f} ms)"])
    parts.append(_table(["ceiling", "measured"], rows))

    parts.append("### Fan-out throughput (HTTP in, Cassandra inbox rows out)")
    parts.append(_table(
        ["worker processes", "events", "inbox rows", "seconds", "rows/s", "ratio to best insert"],
        [[r["workers"], r["events"], r["rows"], r["seconds"], r["rows_per_s"],
          f"{r['ratio_to_ceiling']:.0%}"] for r in result["fanout"]]))

    parts.append("### Delivery latency (202 -> readable in the last follower's inbox)")
    rows = []
    for label, entries in result["latency"].items():
        rows += [[label, r["followers"], r["samples"], r["p50_ms"], r["p99_ms"], r["max_ms"]]
                 for r in entries]
    parts.append(_table(["system", "followers", "samples", "p50 ms", "p99 ms", "max ms"], rows))

    parts.append("### Strategies on the same graph and events")
    rows = []
    for s in result["strategies"]:
        reads = {r["celebrities"]: r for r in s["reads"]}
        rows.append([s["strategy"], s["rows_per_event"],
                     f"{s['mega_fanout_s']:.2f} s ({s['mega_rows']:,} rows)",
                     *(f"{reads[k]['p50_ms']:.1f} / {reads[k]['p99_ms']:.1f}"
                       for k in (0, 3, 30))])
    mega = result["strategies"][0]["mega_followers"] if result["strategies"] else 0
    parts.append(_table(
        ["strategy", "rows per event", f"fan-out of one {mega:,}-follower post",
         "inbox p50/p99 ms, 0 celebrities", "3 celebrities", "30 celebrities"], rows))
    noop_rps = noop["rps"] or 1
    read_rows = [[s["strategy"], r["celebrities"], r["rps"], f"{r['rps'] / noop_rps:.0%}",
                  r["errors"]] for s in result["strategies"] for r in s["reads"]]
    parts.append(_table(["strategy", "celebrities followed", "GET /v1/inbox req/s",
                         "ratio to no-op handler", "errors"], read_rows))

    if "locust" in result:
        lo = result["locust"]
        parts.append(f"### locust mixed workload ({lo['users']} users, {lo['duration_s']} s)")
        entries = [*lo["endpoints"], lo["total"]] if lo["total"] else lo["endpoints"]
        parts.append(_table(
            ["endpoint", "requests", "failures", "req/s", "p50 ms", "p95 ms", "p99 ms"],
            [[e["name"], e["requests"], e["failures"], e["rps"], e["p50_ms"], e["p95_ms"],
              e["p99_ms"]] for e in entries]))
    return "\n\n".join(parts) + "\n"


def charts(result: dict[str, Any], out: Path, name: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    workers = [r["workers"] for r in result["fanout"]]
    ax.plot(workers, [r["rows_per_s"] for r in result["fanout"]], marker="o",
            label="feedsvc fan-out")
    ax.axhline(result["ceilings"]["cassandra"]["best"]["rows_per_s"], color="grey",
               linestyle="--", label="raw insert ceiling")
    ax.set_xlabel("worker processes")
    ax.set_ylabel("inbox rows / s")
    ax.set_xticks(workers)
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.set_title("Fan-out throughput")
    fig.tight_layout()
    paths.append(out / f"{name}-throughput.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    labels, p50, p99 = [], [], []
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
    fig.tight_layout()
    paths.append(out / f"{name}-latency.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

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
    fig.tight_layout()
    paths.append(out / f"{name}-reads.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write_report(result: dict[str, Any], out: Path, name: str) -> str:
    text = markdown(result)
    (out / f"{name}.md").write_text(text)
    charts(result, out, name)
    return text
