"""deploy/grafana: provisioning and the dashboard JSON, checked structurally (Grafana itself
is not installable here); every PromQL expression parsed by promtool."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from guard.metrics import GuardMetrics
from tests.deploy.helpers import (
    DASHBOARD,
    DEPLOY,
    GRAFANA_DIR,
    check_promql_with_promtool,
    dashboard_exprs,
    exported_families,
    load_yaml,
    metric_names,
    unknown_metric_names,
    volume_mounts,
)

PROVISIONING = GRAFANA_DIR / "provisioning"


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def datasource_uid() -> str:
    (source,) = load_yaml(PROVISIONING / "datasources" / "prometheus.yaml")["datasources"]
    assert source["type"] == "prometheus"
    uid: str = source["uid"]
    return uid


def test_every_panel_queries_the_provisioned_prometheus(dashboard: dict[str, Any]) -> None:
    uid = datasource_uid()
    for panel in panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"]["uid"] == uid, panel["title"]


def test_panels_fit_the_grid_without_overlapping(dashboard: dict[str, Any]) -> None:
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        area = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not area & cells, f"panel {panel['title']!r} overlaps another"
        cells |= area
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(set(ids)) == len(ids)


def expressions_of(dashboard: dict[str, Any], predicate: str) -> str:
    return "\n".join(
        t["expr"]
        for p in panels(dashboard)
        if predicate in p["title"].lower()
        for t in p["targets"]
    )


@pytest.mark.parametrize(
    ("title", "needles"),
    [
        ("request rate", ["hguard_requests_total"]),
        (
            "latency p50",
            [
                "histogram_quantile(0.5,",
                "histogram_quantile(0.95,",
                "histogram_quantile(0.99,",
                "hguard_request_duration_seconds_bucket",
            ],
        ),
        ("first token", ["hguard_time_to_first_token_seconds_bucket"]),
        ("tokens per second", ["hguard_generated_tokens_total"]),
        ("validation", ["hguard_probe_validation_risk_quantile", "hguard_answer_risk_bucket"]),
        ("decisions", ["hguard_decisions_total", "by (decision)"]),
        ("abort", ["hguard_aborts_total"]),
        ("out-of-scope", ["hguard_out_of_scope_total"]),
        ("queue depth", ["hguard_queue_depth"]),
        ("batch size", ["hguard_batch_size_bucket"]),
        ("model and probe", ["hguard_build_info"]),
    ],
)
def test_the_dashboard_shows(dashboard: dict[str, Any], title: str, needles: list[str]) -> None:
    exprs = expressions_of(dashboard, title)
    assert exprs, f"no panel titled like {title!r}"
    for needle in needles:
        assert needle in exprs, f"{title!r} panels do not query {needle}"


def test_risk_distribution_is_a_heatmap_of_the_risk_histogram(dashboard: dict[str, Any]) -> None:
    (heatmap,) = [p for p in panels(dashboard) if p["type"] == "heatmap"]
    (target,) = heatmap["targets"]
    assert "hguard_answer_risk_bucket" in target["expr"]
    assert target["format"] == "heatmap"
    assert heatmap["options"]["calculate"] is False  # buckets come from Prometheus


def test_every_expression_parses_as_promql(dashboard: dict[str, Any], tmp_path: Path) -> None:
    check_promql_with_promtool(dashboard_exprs(dashboard), tmp_path)


def test_dashboard_names_only_metrics_the_guard_exports(dashboard: dict[str, Any]) -> None:
    registry = CollectorRegistry()
    GuardMetrics(registry)
    families = exported_families(generate_latest(registry).decode())
    names = metric_names(dashboard_exprs(dashboard))
    assert unknown_metric_names(names, families) == set()


def test_provisioning_loads_the_dashboard_directory_compose_mounts() -> None:
    (provider,) = load_yaml(PROVISIONING / "dashboards" / "hguard.yaml")["providers"]
    assert provider["type"] == "file"
    grafana = load_yaml(DEPLOY / "compose.yaml")["services"]["grafana"]
    mounts = volume_mounts(grafana)
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"


def test_every_panel_query_follows_the_replica_filter(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "hguard-overview"
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"job", "instance"}
    for panel in panels(dashboard):
        for target in panel["targets"]:
            selectors = re.findall(r"hguard_\w+\{([^}]*)\}", target["expr"])
            assert selectors, target["expr"]
            for selector in selectors:
                assert 'job=~"$job"' in selector and 'instance=~"$instance"' in selector, (
                    f"panel {panel['title']!r}: {target['expr']}"
                )
