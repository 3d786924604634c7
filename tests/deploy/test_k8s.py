"""deploy/k8s: core kinds validated against the Kubernetes OpenAPI schemas bundled in
kubernetes-validate (offline), operator kinds checked structurally and their PromQL by
promtool, and the wiring between the objects. No cluster here: nothing is applied."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from guard.settings import GuardSettings
from tests.deploy.helpers import (
    K8S_DIR,
    check_promql_with_promtool,
    load_yaml,
    load_yaml_all,
    tool,
)

CORE_KINDS = {
    "Namespace",
    "ConfigMap",
    "Secret",
    "Deployment",
    "Service",
    "HorizontalPodAutoscaler",
    "PodDisruptionBudget",
}
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}
# the oldest Kubernetes still in wide use, and the newest the validator bundles
VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())


def resources() -> dict[str, dict[str, Any]]:
    """kind -> the one manifest of that kind, from the files kustomization.yaml lists."""
    found: dict[str, dict[str, Any]] = {}
    for name in load_yaml(K8S_DIR / "kustomization.yaml")["resources"]:
        for doc in load_yaml_all(K8S_DIR / name):
            assert doc["kind"] not in found, f"two {doc['kind']} manifests"
            found[doc["kind"]] = doc
    return found


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict[str, Any]]:
    return resources()


def test_kustomization_lists_every_manifest_and_only_known_kinds() -> None:
    listed = set(load_yaml(K8S_DIR / "kustomization.yaml")["resources"])
    on_disk = {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    assert set(resources()) == CORE_KINDS | OPERATOR_KINDS


@pytest.mark.parametrize("version", VERSIONS)
def test_core_kinds_match_the_kubernetes_schemas(
    k8s: dict[str, dict[str, Any]], version: str
) -> None:
    for kind in CORE_KINDS:
        kubernetes_validate.validate(k8s[kind], version, strict=True)


def test_the_schema_check_rejects_a_misspelt_field(k8s: dict[str, dict[str, Any]]) -> None:
    deployment = k8s["Deployment"]
    container = dict(deployment["spec"]["template"]["spec"]["containers"][0])
    container["readinesProbe"] = container.pop("readinessProbe")
    broken = {
        **deployment,
        "spec": {
            **deployment["spec"],
            "template": {
                **deployment["spec"]["template"],
                "spec": {**deployment["spec"]["template"]["spec"], "containers": [container]},
            },
        },
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[0], strict=True)


def test_the_validator_works_without_a_network() -> None:
    unshare = tool("unshare")
    files = [
        str(K8S_DIR / f"{name}.yaml")
        for name in ("namespace", "configmap", "secret", "deployment", "service", "hpa", "pdb")
    ]
    done = subprocess.run(
        [unshare, "--net", tool("kubernetes-validate"), "--strict", "-k", VERSIONS[0], *files],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("passed") == len(files), done.stdout


def test_deployment_probes_and_resources(k8s: dict[str, dict[str, Any]]) -> None:
    pod = k8s["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert "--port" in container["args"]
    assert str(ports["http"]) == container["args"][container["args"].index("--port") + 1]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_settings_come_from_the_configmap_and_keys_from_the_secret(
    k8s: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    (container,) = k8s["Deployment"]["spec"]["template"]["spec"]["containers"]
    sources = {next(iter(s)): next(iter(s.values()))["name"] for s in container["envFrom"]}
    assert sources == {
        "configMapRef": k8s["ConfigMap"]["metadata"]["name"],
        "secretRef": k8s["Secret"]["metadata"]["name"],
    }
    settings = k8s["ConfigMap"]["data"]
    secret = k8s["Secret"]["stringData"]
    assert set(secret) == {"GUARD_API_KEYS"}
    known = {f"GUARD_{name.upper()}" for name in GuardSettings.model_fields}
    assert set(settings) <= known, f"not GUARD_ settings: {sorted(set(settings) - known)}"
    for key, value in {**settings, **secret}.items():
        monkeypatch.setenv(key, value)
    parsed = GuardSettings()
    assert parsed.api_keys == secret["GUARD_API_KEYS"].split(",")
    assert parsed.max_batch == int(settings["GUARD_MAX_BATCH"])
    grace = k8s["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > parsed.shutdown_grace_s + 5  # preStop sleeps 5 s first


def test_service_and_servicemonitor_select_the_guard_pods(k8s: dict[str, dict[str, Any]]) -> None:
    pod_labels = k8s["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert k8s["Deployment"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    service = k8s["Service"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert k8s["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= (
        pod_labels.items()
    )
    monitor = k8s["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= (
        service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [service["metadata"]["namespace"]]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    # the alert rules select job="hguard": the operator names the job after the Service
    assert service["metadata"]["name"] == "hguard" and "jobLabel" not in monitor["spec"]


def test_hpa_scales_the_deployment_on_cpu_and_queue_depth(k8s: dict[str, dict[str, Any]]) -> None:
    hpa = k8s["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": k8s["Deployment"]["metadata"]["name"],
    }
    by_type = {m["type"]: m for m in hpa["metrics"]}
    assert by_type["Resource"]["resource"]["name"] == "cpu"
    assert by_type["Pods"]["pods"]["metric"]["name"] == "hguard_queue_depth"
    assert 1 <= hpa["minReplicas"] < hpa["maxReplicas"]


def test_prometheus_adapter_exposes_the_queue_depth_the_hpa_reads(tmp_path: Path) -> None:
    (rule,) = load_yaml(K8S_DIR / "adapter" / "values.yaml")["rules"]["custom"]
    assert rule["seriesQuery"].startswith("hguard_queue_depth{")
    assert rule["name"]["as"] == "hguard_queue_depth"
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    query = (
        rule["metricsQuery"]
        .replace("<<.Series>>", "hguard_queue_depth")
        .replace("<<.LabelMatchers>>", 'namespace="hguard", pod=~"hguard-.*"')
        .replace("<<.GroupBy>>", "pod")
    )
    check_promql_with_promtool([rule["seriesQuery"], query], tmp_path)


def test_operator_kinds_have_the_fields_the_operator_needs(k8s: dict[str, dict[str, Any]]) -> None:
    for kind in OPERATOR_KINDS:
        resource = k8s[kind]
        assert resource["apiVersion"] == "monitoring.coreos.com/v1"
        assert resource["metadata"]["namespace"] == "hguard"
        # kube-prometheus-stack selects rules and monitors by its release label by default
        assert resource["metadata"]["labels"]["release"] == "prometheus"
    for group in k8s["PrometheusRule"]["spec"]["groups"]:
        assert group["name"] and group["rules"]
        for rule in group["rules"]:
            assert ("alert" in rule) != ("record" in rule) and rule["expr"]
