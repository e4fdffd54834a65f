"""Operations: Prometheus metrics, JSON logs, ``GET /v1/status``, the queue's figures and
``feedsvc status``; in process on both backends, and with a real ``feedsvc api`` and
``feedsvc worker --metrics-port`` on both backends."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from feedsvc import logs, metrics, ops
from feedsvc.client import FeedClient
from feedsvc.model import Envelope, Event, EventIn, FanoutTask
from feedsvc.ops import ServiceStatus
from feedsvc.runtime import Runtime
from feedsvc.seed import write_graph
from feedsvc.workers import process
from tests.conftest import SERVICE_KEY, MakeApi, MakeRuntime
from tests.procs import feedsvc, free_port, get, parse, process_env, scrape, value
from tests.test_deploy import assert_dashboard_metrics_exist

_status = msgspec.json.Decoder(ServiceStatus)


def samples_now() -> dict[Any, float]:
    return parse(metrics.exposition()[0].decode())


# --- in process ---------------------------------------------------------------------------


async def test_metrics_need_the_service_key_unless_public(make_api: MakeApi) -> None:
    api = await make_api()
    c = api.client
    assert (await c.get("/metrics")).status == 401
    assert (await c.get("/metrics", headers=api.token(api.user("u")))).status == 403
    response = await c.get("/metrics", headers=api.service)
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    text = await response.text()
    assert "feedsvc_queue_depth{" in text and "process_cpu_seconds_total" in text
    public = await make_api(metrics_public=True)
    assert (await public.client.get("/metrics")).status == 200
    assert (await public.client.get("/v1/status")).status == 401  # only /metrics is public


async def test_http_and_fanout_metrics_move_with_events(make_api: MakeApi) -> None:
    api = await make_api()
    author, fans = api.user("author"), [api.user(f"f{i}") for i in range(3)]
    await api.bulk([(f, author) for f in fans])
    await api.drain()  # their backfill (nothing yet) out of the way
    before = samples_now()
    for _ in range(4):
        await api.post_ok(author)
    stats = {s.queue + ":" + s.priority: s for s in await api.rt.queue.stream_stats()}
    assert stats["fanout:medium"].depth == 4 and stats["fanout:medium"].oldest_ms is not None
    assert stats["fanout:medium"].pending == 0
    await api.drain()
    after = samples_now()

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("feedsvc_http_requests_total", route="/v1/events", method="POST",
                 status="202") == 4
    assert delta("feedsvc_http_request_duration_seconds_count", route="/v1/events") == 4
    assert delta("feedsvc_fanout_events_total", route="push") == 4
    assert delta("feedsvc_inbox_rows_written_total") == 4 * (len(fans) + 1)
    assert delta("feedsvc_post_to_visible_seconds_count") == 4
    assert delta("feedsvc_worker_tasks_total", queue="fanout", outcome="done") == 4
    store, queue = metrics.backend_names(api.rt)
    assert delta("feedsvc_backend_request_duration_seconds_count", backend=store,
                 op="write_inbox") >= 4
    assert delta("feedsvc_backend_request_duration_seconds_count", backend=queue,
                 op="ack") == 4
    # The scrape reads the queue: nothing is left in it now.
    response = await api.client.get("/metrics", headers=api.service)
    scraped = parse(await response.text())
    assert value(scraped, "feedsvc_queue_depth", queue="fanout") == 0
    assert value(scraped, "feedsvc_backend_up", backend=store) == 1
    assert value(scraped, "feedsvc_backend_up", backend=queue) == 1
    # A route's template is its label, never the path with its values.
    await api.client.get(f"/v1/users/{author}", headers=api.service)
    assert value(samples_now(), "feedsvc_http_requests_total",
                 route="/v1/users/{user_id}", status="200") >= 1
    assert not any(author in str(labels) for (_, labels) in samples_now())


async def test_dead_letters_and_shed_are_counted(make_api: MakeApi) -> None:
    api = await make_api(low_max_age=0.05)
    author = api.user("author")
    await api.post_ok(author, priority="low")
    before = samples_now()
    await asyncio.sleep(0.2)
    await api.drain()  # the low entry is too old now: shed
    rt = api.rt
    event = await rt.store.get_event(f"{api.prefix}-e1")
    assert event is not None
    await rt.queue.bury("fanout", "medium", Envelope(FanoutTask(event), rt.now_ms()),
                        "poison", "a test's dead letter")
    after = samples_now()
    assert value(after, "feedsvc_shed_events_total", queue="fanout", priority="low") - value(
        before, "feedsvc_shed_events_total", queue="fanout", priority="low") == 1
    for reason in ("shed", "poison"):
        assert value(after, "feedsvc_dead_letters_total", queue="fanout", reason=reason) - \
            value(before, "feedsvc_dead_letters_total", queue="fanout", reason=reason) == 1
    response = await api.client.get("/v1/status", headers=api.service)
    status = _status.decode(await response.read())
    assert (status.dead_letters, status.shed) == (2, 1)


async def test_status_adds_up_the_processes(make_api: MakeApi) -> None:
    api = await make_api()
    rt = api.rt
    author, fan = api.user("author"), api.user("fan")
    await api.follow(fan, author)
    first = _status.decode(await (await api.client.get("/v1/status",
                                                        headers=api.service)).read())
    assert first.backend == ("embedded" if rt.settings.embedded else "cassandra+redis")
    assert {d.name for d in first.dependencies} == set(metrics.backend_names(rt))
    assert all(d.ok for d in first.dependencies)
    assert {(s.queue, s.priority) for s in first.streams} == {
        (q, p) for q in metrics.QUEUES for p in metrics.PRIORITIES}
    for _ in range(3):
        await api.post_ok(author)
    await api.drain()
    await api.page(fan)
    # Another process's report, as a worker elsewhere writes it.
    other = msgspec.structs.replace(ops.REPORTER.report(rt), id=f"{api.prefix}-worker",
                                    role="worker", queues=["fanout"], totals={
                                        "fanout_events": 1000.0}, rates={})
    await rt.queue.put_report(other.id, msgspec.msgpack.encode(other))
    status = _status.decode(await (await api.client.get("/v1/status",
                                                         headers=api.service)).read())
    assert status.totals.fanout_events - first.totals.fanout_events >= 1003
    assert status.totals.posts - first.totals.posts == 3
    assert status.totals.reads - first.totals.reads == 1
    assert status.post_to_visible.samples >= 3 and status.post_to_visible.p50_s is not None
    assert status.post_to_visible.p99_s is not None
    assert status.post_to_visible.p50_s <= status.post_to_visible.p99_s
    roles = {p.id: p for p in status.processes}
    assert roles[other.id].role == "worker" and roles[other.id].queues == ["fanout"]
    assert roles[ops.REPORTER.id].seen_s_ago == 0
    await rt.queue.drop_report(other.id)
    assert other.id not in {p.id for p in (await ops.status(rt)).processes}


async def test_status_page_is_the_packaged_html(make_api: MakeApi) -> None:
    api = await make_api()
    response = await api.client.get("/status")  # no key: the page asks for it
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/html")
    assert "connect-src 'self'" in response.headers["Content-Security-Policy"]
    html = await response.text()
    assert "sessionStorage" in html and "/v1/status" in html and "/replay" in html
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "")  # nothing fetched


def test_quantile_interpolates_within_buckets() -> None:
    bounds = [0.1, 0.5, 1.0]
    assert ops.quantile(0.5, bounds, [0, 0, 0, 0]) is None
    assert ops.quantile(0.5, bounds, [10, 0, 0, 0]) == pytest.approx(0.05)
    assert ops.quantile(0.5, bounds, [0, 4, 4, 0]) == pytest.approx(0.5)
    assert ops.quantile(0.99, bounds, [0, 0, 0, 3]) == 1.0  # +Inf: the highest bound


async def test_stream_stats_and_reports(runtime: Runtime, prefix: str) -> None:
    queue = runtime.queue
    event = Event(f"{prefix}-e", "a", "k", runtime.now_ms(), "high", "{}", "push",
                  runtime.now_ms(), "")
    before = runtime.now_ms()
    await queue.enqueue("high", Envelope(FanoutTask(event), before))
    await queue.enqueue("high", Envelope(FanoutTask(event), before))
    claimed = await queue.claim(f"{prefix}-c", 0.5)
    assert claimed is not None
    by = {(s.queue, s.priority): s for s in await queue.stream_stats()}
    high = by["fanout", "high"]
    assert (high.depth, high.pending) == (2, 1)
    assert high.oldest_ms is not None and abs(high.oldest_ms - before) < 5_000
    assert by["email", "low"].depth == 0 and by["email", "low"].oldest_ms is None
    await queue.ack(claimed)
    by = {(s.queue, s.priority): s for s in await queue.stream_stats()}
    assert (by["fanout", "high"].depth, by["fanout", "high"].pending) == (1, 0)

    await queue.put_report(f"{prefix}-p1", b"one")
    await queue.put_report(f"{prefix}-p1", b"two")
    await queue.put_report(f"{prefix}-p2", b"other")
    mine = sorted(body for _, body in await queue.reports(60) if body in (b"two", b"other",
                                                                          b"one"))
    assert mine == [b"other", b"two"]
    await queue.drop_report(f"{prefix}-p1")
    assert b"two" not in {body for _, body in await queue.reports(60)}
    await queue.drop_report(f"{prefix}-p2")


def test_json_log_lines_carry_the_context() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.JsonFormatter())
    handler.addFilter(logs.ContextFilter())
    logger = logging.getLogger("feedsvc.test_json")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        with logs.bound(event_id="ev-1", entry_id="17-0"):
            logger.info("fanned out %d", 3)
            logger.warning("given explicitly", extra={"user_id": "u-9", "event_id": "ev-2"})
        logger.info("outside")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines[0]["message"] == "fanned out 3"
    assert (lines[0]["event_id"], lines[0]["entry_id"], lines[0]["level"]) == (
        "ev-1", "17-0", "INFO")
    assert lines[0]["logger"] == "feedsvc.test_json" and lines[0]["time"].endswith("Z")
    assert (lines[1]["event_id"], lines[1]["user_id"]) == ("ev-2", "u-9")
    assert "event_id" not in lines[2]
    assert "ValueError: boom" in lines[3]["exc"]
    text = logs.TextFormatter().format(logging.LogRecord(
        "feedsvc.x", logging.INFO, __file__, 1, "hello", None, None))
    assert text.endswith("feedsvc.x: hello")


async def test_a_task_logs_its_ids(make_runtime: MakeRuntime, prefix: str,
                                   caplog: pytest.LogCaptureFixture,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    rt = await make_runtime()
    event = Event(f"{prefix}-bad", "a", "k", rt.now_ms(), "medium", "{}", "push",
                  rt.now_ms(), "")

    async def fails(rt: Runtime, envelope: Envelope) -> None:
        logging.getLogger("feedsvc.fanout").warning("about to fail")
        raise ValueError("a bug")

    monkeypatch.setattr("feedsvc.workers.fanout.handle", fails)
    await rt.queue.enqueue("medium", Envelope(FanoutTask(event), rt.now_ms()))
    delivery = await rt.queue.claim(f"{prefix}-c", 0.5)
    assert delivery is not None
    caplog.set_level(logging.DEBUG, logger="feedsvc")
    handler_filter = logs.ContextFilter()
    caplog.handler.addFilter(handler_filter)
    try:
        await process(rt, delivery)
    finally:
        caplog.handler.removeFilter(handler_filter)
    lines = [r for r in caplog.records if getattr(r, "event_id", None) == f"{prefix}-bad"]
    assert {r.getMessage().split(";")[0] for r in lines} >= {
        "about to fail", f"task {delivery.entry_id} failed permanently"}
    assert all(getattr(r, "entry_id", None) == delivery.entry_id for r in lines)
    assert (await rt.queue.stats()).dead_letters == 1


# --- real processes -----------------------------------------------------------------------


async def _eventually(check: Any, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = await asyncio.to_thread(check)
        if result:
            return result
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.3)


@pytest.mark.slow
async def test_real_api_and_worker_report_events_as_they_flow(
    make_runtime: MakeRuntime, prefix: str, tmp_path: Path
) -> None:
    rt = await make_runtime(celebrity_threshold=1_000)
    author, fans = f"{prefix}-author", [f"{prefix}-fan{i}" for i in range(3)]
    await write_graph(rt, iter([(f, author) for f in fans]), progress=False)  # no backfill
    api_port, metrics_port = free_port(), free_port()
    api_env = process_env(rt.settings, FEEDSVC_PORT=str(api_port), FEEDSVC_LOG_FORMAT="json")
    # No outbox sweeps: on Cassandra the session's keyspace holds other tests' events, which
    # a sweeping worker would fan out here too.
    worker_env = process_env(rt.settings, FEEDSVC_SWEEP_AFTER="6h")
    with feedsvc(["api", "--processes", "1"], api_env, tmp_path / "api.log", api_port) as api, \
            feedsvc(["worker", "--processes", "1", "--concurrency", "2", "--metrics-port",
                     str(metrics_port)], worker_env, tmp_path / "worker.log",
                    metrics_port) as worker:
        # /metrics: the key's rule on both.
        for url in (api.url, worker.url):
            assert (await asyncio.to_thread(get, url + "/metrics", None))[0] == 401
        _, api_before = await asyncio.to_thread(scrape, api.url)
        _, worker_before = await asyncio.to_thread(scrape, worker.url)

        events = [f"{prefix}-ev{i}" for i in range(5)]
        async with FeedClient(api.url, credential=SERVICE_KEY) as client:
            for event_id in events:
                await client.post_event(EventIn(event_id=event_id, author_id=author,
                                                kind="post", payload={"n": 1}))

        def fanned_out() -> Any:
            _, now = scrape(worker.url)
            acked = value(now, "feedsvc_worker_tasks_total", queue="fanout") - value(
                worker_before, "feedsvc_worker_tasks_total", queue="fanout")
            return now if acked >= len(events) else None  # written, then acknowledged

        worker_after = await _eventually(fanned_out)
        store, queue = metrics.backend_names(rt)

        def grew(name: str, **labels: str) -> float:
            return value(worker_after, name, **labels) - value(worker_before, name, **labels)

        assert grew("feedsvc_inbox_rows_written_total") == len(events) * (len(fans) + 1)
        assert grew("feedsvc_post_to_visible_seconds_count") == len(events)
        assert grew("feedsvc_worker_tasks_total", queue="fanout", outcome="done") == len(events)
        assert grew("feedsvc_backend_request_duration_seconds_count", backend=store) > 0
        assert grew("feedsvc_backend_request_duration_seconds_count", backend=queue) > 0
        assert value(worker_after, "feedsvc_backend_up", backend=queue) == 1
        api_text, api_after = await asyncio.to_thread(scrape, api.url)
        worker_text, _ = await asyncio.to_thread(scrape, worker.url)
        assert_dashboard_metrics_exist(api_text, worker_text)
        assert value(api_after, "feedsvc_http_requests_total", route="/v1/events",
                     status="202") - value(api_before, "feedsvc_http_requests_total",
                                           route="/v1/events", status="202") == len(events)

        # The status: the worker's report, added up with the API's own figures.
        def status_with_worker() -> ServiceStatus | None:
            code, body, _ = get(api.url + "/v1/status")
            assert code == 200, body[:300]
            status = _status.decode(body)
            workers = [p for p in status.processes if p.role == "worker"
                       and p.pid == worker.process.pid]
            seen = workers and status.totals.fanout_events >= len(events)
            return status if seen and status.totals.posts >= len(events) else None

        status = await _eventually(status_with_worker)
        worker_row = next(p for p in status.processes if p.pid == worker.process.pid)
        assert worker_row.consumers >= 2 and "fanout" in worker_row.queues  # + its senders
        assert worker_row.consumers_alive == worker_row.consumers
        assert any(p.role == "api" and p.pid == api.process.pid for p in status.processes)
        assert status.post_to_visible.samples >= len(events)

        # `feedsvc status`, from the backends, once.
        shown = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "feedsvc.cli", "status"],
            env={**worker_env, "COLUMNS": "160"}, capture_output=True, text=True,
            timeout=120, check=False)
        assert shown.returncode == 0, shown.stderr[-3000:]
        assert "events fanned out" in shown.stdout and "post → visible p99" in shown.stdout
        assert f"-{worker.process.pid}" in shown.stdout
        as_json = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "feedsvc.cli", "status", "--json",
                             "--url", api.url], env=worker_env, capture_output=True,
            timeout=120, check=False)
        assert as_json.returncode == 0, as_json.stderr[-3000:]
        assert _status.decode(as_json.stdout.strip()).totals.fanout_events >= len(events)

    # JSON logs: every line of the API's log is one object; the access line of each post
    # names its event.
    records = [json.loads(line) for line in api.log_text().splitlines() if line.strip()]
    posted = {r["event_id"] for r in records
              if r["logger"] == "feedsvc.access" and r.get("route") == "/v1/events"}
    assert posted == set(events)
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    # The worker left the status when it stopped.
    assert worker.process.pid not in {p.pid for p in (await ops.status(rt)).processes}


@pytest.mark.slow
@pytest.mark.parametrize("make_runtime", ["cassandra"], indirect=True)
async def test_several_processes_answer_for_all(make_runtime: MakeRuntime, prefix: str,
                                                tmp_path: Path) -> None:
    """``--processes 2``: Prometheus' multiprocess mode, so one scrape of the worker's
    metrics port, or of any API process, adds up every process; each one reports itself to
    the status."""
    rt = await make_runtime(celebrity_threshold=1_000)
    author, fans = f"{prefix}-author", [f"{prefix}-fan{i}" for i in range(2)]
    await write_graph(rt, iter([(f, author) for f in fans]), progress=False)
    api_port, metrics_port = free_port(), free_port()
    env = process_env(rt.settings, FEEDSVC_SWEEP_AFTER="6h")
    events = [f"{prefix}-ev{i}" for i in range(8)]
    with feedsvc(["api", "--processes", "2"], {**env, "FEEDSVC_PORT": str(api_port)},
                 tmp_path / "api.log", api_port) as api, \
            feedsvc(["worker", "--processes", "2", "--concurrency", "1", "--senders", "0",
                     "--metrics-port", str(metrics_port)], env, tmp_path / "worker.log",
                    metrics_port) as worker:
        async with FeedClient(api.url, credential=SERVICE_KEY) as client:
            for event_id in events:
                await client.post_event(EventIn(event_id=event_id, author_id=author,
                                                kind="post", payload={}))

        def all_fanned_out() -> Any:
            _, now = scrape(worker.url)
            done = value(now, "feedsvc_worker_tasks_total", queue="fanout", outcome="done")
            return now if done >= len(events) else None

        after = await _eventually(all_fanned_out)
        assert value(after, "feedsvc_fanout_events_total") == len(events)
        assert value(after, "feedsvc_inbox_rows_written_total") == len(events) * (len(fans) + 1)
        assert value(after, "feedsvc_post_to_visible_seconds_count") == len(events)
        pids = {labels for (name, labels) in after if name == "feedsvc_process_cpu_seconds"}
        assert len(pids) >= 2  # one series per live process (label pid)
        for _ in range(4):  # whichever API process answers, the posts of both are counted
            _, scraped = await asyncio.to_thread(scrape, api.url)
            assert value(scraped, "feedsvc_http_requests_total", route="/v1/events",
                         status="202") == len(events)

        def both_workers() -> ServiceStatus | None:
            status = _status.decode(get(api.url + "/v1/status")[1])
            workers = [p for p in status.processes if p.role == "worker"]
            apis = [p for p in status.processes if p.role == "api"]
            # Each process reports every few seconds: wait for reports made after the work.
            done = sum(p.fanout_events for p in status.processes) == len(events)
            return status if len(workers) == 2 and len(apis) == 2 and done else None

        status = await _eventually(both_workers)
        assert worker.process.pid not in {p.pid for p in status.processes}  # the children
    leftovers = [line for line in worker.log_text().splitlines() if "Traceback" in line]
    assert not leftovers, worker.log_text()[-3000:]


async def test_read_cache_and_breaker_metrics(make_api: MakeApi) -> None:
    api = await make_api()
    author, reader = api.user("author"), api.user("reader")
    await api.follow(reader, author)
    before = samples_now()
    for _ in range(3):
        await api.page(reader)
    breaker = api.rt.breakers.get("fcm")
    for _ in range(10):
        breaker.record(False, time.monotonic())
    response = await api.client.get("/metrics", headers=api.service)
    after = parse(await response.text())
    assert value(after, "feedsvc_read_cache_lookups_total") > value(
        before, "feedsvc_read_cache_lookups_total")
    assert value(after, "feedsvc_breaker_state", provider="fcm", state="open") == 1
    assert value(after, "feedsvc_breaker_state", provider="fcm", state="closed") == 0
    status = await ops.status(api.rt)
    assert [(b.provider, b.open) for b in status.breakers] == [("fcm", 1)]
