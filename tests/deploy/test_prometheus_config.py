"""deploy/prometheus: promtool accepts the config and rules, and the alert unit tests pass."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry, generate_latest

from guard.metrics import GuardMetrics
from tests.deploy.helpers import (
    K8S_DIR,
    PROMETHEUS_DIR,
    exported_families,
    load_yaml,
    load_yaml_all,
    metric_names,
    rule_exprs,
    run,
    tool,
    unknown_metric_names,
)


def fresh_exposition() -> str:
    """/metrics text of a fresh GuardMetrics (no traffic yet)."""
    registry = CollectorRegistry()
    GuardMetrics(registry)
    return generate_latest(registry).decode()


RULES = PROMETHEUS_DIR / "rules.yml"
REQUIRED_ALERTS = {
    "HGuardTargetDown",
    "HGuardTargetMissing",
    "HGuardHighAbstainRate",
    "HGuardRiskDriftMedian",
    "HGuardRiskDriftTail",
    "HGuardLatencySLOFastBurn",
    "HGuardLatencySLOSlowBurn",
    "HGuardServingUnguarded",
    "HGuardHighErrorRate",
    "HGuardShedding",
}


def test_promtool_accepts_the_scrape_config_and_its_rule_files() -> None:
    done = run([tool("promtool"), "check", "config", str(PROMETHEUS_DIR / "prometheus.yml")])
    assert "1 rule files found" in done.stdout + done.stderr


def test_promtool_accepts_the_rules() -> None:
    done = run([tool("promtool"), "check", "rules", str(RULES)])
    assert "SUCCESS" in done.stdout + done.stderr


def test_every_alert_fires_and_stays_quiet_as_its_unit_tests_say() -> None:
    run([tool("promtool"), "test", "rules", str(PROMETHEUS_DIR / "rules.test.yml")])


def test_the_required_alerts_exist_and_each_has_a_unit_test() -> None:
    alerts = {
        rule["alert"]
        for group in load_yaml(RULES)["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    assert alerts >= REQUIRED_ALERTS
    tested = {
        case["alertname"]
        for test in load_yaml(PROMETHEUS_DIR / "rules.test.yml")["tests"]
        for case in test.get("alert_rule_test", [])
        if case["exp_alerts"]
    }
    assert alerts <= tested, f"alerts never shown to fire: {sorted(alerts - tested)}"


def test_alerts_select_the_job_the_scrape_config_defines() -> None:
    jobs = {
        job["job_name"] for job in load_yaml(PROMETHEUS_DIR / "prometheus.yml")["scrape_configs"]
    }
    exprs = "\n".join(rule_exprs(load_yaml(RULES)["groups"]))
    assert 'job="hguard"' in exprs
    assert "hguard" in jobs


def test_rules_name_only_metrics_the_guard_exports() -> None:
    families = exported_families(fresh_exposition())
    names = metric_names(rule_exprs(load_yaml(RULES)["groups"]))
    assert {"hguard_probe_validation_risk_quantile", "hguard_answer_risk_bucket"} <= names
    assert unknown_metric_names(names, families) == set()


def test_the_metric_check_catches_a_misspelt_or_mistyped_name() -> None:
    families = exported_families(fresh_exposition())
    bad = {"hguard_request_total", "hguard_queue_depth_total", "hguard_decisions_bucket"}
    assert unknown_metric_names(bad, families) == bad


def test_prometheusrule_carries_exactly_the_rule_groups_of_rules_yml(tmp_path: Path) -> None:
    (resource,) = load_yaml_all(K8S_DIR / "prometheusrule.yaml")
    assert resource["apiVersion"] == "monitoring.coreos.com/v1"
    assert resource["kind"] == "PrometheusRule"
    groups = resource["spec"]["groups"]
    assert groups == load_yaml(RULES)["groups"], (
        "deploy/k8s/prometheusrule.yaml drifted from deploy/prometheus/rules.yml: "
        "copy the groups of rules.yml into spec.groups"
    )
    extracted = tmp_path / "prometheusrule.rules.yml"
    extracted.write_text(yaml.safe_dump({"groups": groups}))
    run([tool("promtool"), "check", "rules", str(extracted)])


def test_drift_alerts_use_quantiles_the_probe_builder_stores() -> None:
    from probes.calibration import QUANTILES

    exprs = "\n".join(rule_exprs(load_yaml(RULES)["groups"]))
    used = set(re.findall(r'hguard_probe_validation_risk_quantile\{quantile="([^"]+)"\}', exprs))
    assert used == {"0.5", "0.9"}
    assert used <= set(QUANTILES), "the probe manifest would not carry these quantiles"
