"""docker-compose.yml's monitoring: Prometheus scrapes the API and every worker with the
service key, Grafana loads the feedsvc dashboard from the repo, and every metric the
dashboard queries is one feedsvc really exposes (checked against real ``/metrics`` output
after events flowed, in ``tests/test_ops.py``)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from tests.procs import parse

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "feedsvc.json"
_METRIC = re.compile(r"\b(?:feedsvc|process|python)_[a-z0-9_]+\b")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """A compose service's bind mounts: container path -> path in the repo."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            out[target] = source[2:]
    return out


def dashboard_queries() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in board["panels"] for target in panel.get("targets", [])]


def dashboard_metrics() -> set[str]:
    return {name for expr in dashboard_queries() for name in _METRIC.findall(expr)}


def assert_dashboard_metrics_exist(*expositions: str) -> None:
    """Every metric the dashboard queries is a sample name in one of ``expositions``."""
    exposed = {name for text in expositions for name, _ in parse(text)}
    missing = dashboard_metrics() - exposed
    assert not missing, f"the dashboard queries metrics nothing exposes: {sorted(missing)}"


def test_compose_runs_prometheus_and_grafana_on_the_repo_files() -> None:
    services = load_yaml(COMPOSE)["services"]
    prometheus, grafana = services["prometheus"], services["grafana"]
    config = mounts(prometheus)["/etc/prometheus/prometheus.yml"]
    assert (ROOT / config).is_file()
    provisioning = ROOT / mounts(grafana)["/etc/grafana/provisioning"]
    dashboards_in = mounts(grafana)
    datasources = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert datasources[0]["type"] == "prometheus"
    assert datasources[0]["url"] == "http://prometheus:9090"
    provider = load_yaml(provisioning / "dashboards" / "feedsvc.yml")["providers"][0]
    folder = dashboards_in[provider["options"]["path"]]
    assert ROOT / folder / DASHBOARD.name == DASHBOARD
    board = json.loads(DASHBOARD.read_text())
    uids = {t["datasource"]["uid"] for p in board["panels"] for t in p.get("targets", [])}
    assert uids == {datasources[0]["uid"]}


def test_prometheus_scrapes_the_api_and_every_worker() -> None:
    services = load_yaml(COMPOSE)["services"]
    config = load_yaml(ROOT / mounts(services["prometheus"])["/etc/prometheus/prometheus.yml"])
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    key = services["api"]["environment"]["FEEDSVC_SERVICE_KEYS"].split(",")[0]
    for job in jobs.values():
        assert job["metrics_path"] == "/metrics"
        assert job["authorization"]["credentials"] == key  # /metrics needs the service key
    api_port = services["api"]["ports"][0].split(":")[-1]
    assert jobs["feedsvc-api"]["static_configs"][0]["targets"] == [f"api:{api_port}"]
    worker = shlex.split(services["worker"]["command"])
    metrics_port = int(worker[worker.index("--metrics-port") + 1])
    discovery = jobs["feedsvc-worker"]["dns_sd_configs"][0]
    assert discovery["names"] == ["worker"] and discovery["port"] == metrics_port


def test_the_dashboard_shows_the_figures_of_the_issue() -> None:
    queried = dashboard_metrics()
    for name in ("feedsvc_http_requests_total", "feedsvc_http_request_duration_seconds_bucket",
                 "feedsvc_queue_depth", "feedsvc_queue_pending",
                 "feedsvc_queue_oldest_age_seconds", "feedsvc_fanout_events_total",
                 "feedsvc_inbox_rows_written_total", "feedsvc_post_to_visible_seconds_bucket",
                 "feedsvc_dead_letters_total", "feedsvc_shed_events_total",
                 "feedsvc_backend_request_duration_seconds_bucket",
                 "feedsvc_backend_request_errors_total", "feedsvc_deliveries_total",
                 "feedsvc_breaker_state", "feedsvc_read_cache_lookups_total"):
        assert name in queried, name
