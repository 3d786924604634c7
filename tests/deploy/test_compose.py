"""deploy/compose.yaml against the Compose Specification JSON schema, plus the wiring
between its services. No Docker engine here: nothing is started.

The schema is the compose-spec schema that check-jsonschema vendors
(check_jsonschema/builtin_schemas/vendor/compose-spec.json, from SchemaStore/compose-spec).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import jsonschema
import pytest

from tests.deploy.helpers import DEPLOY, GRAFANA_DIR, PROMETHEUS_DIR, load_yaml, volume_mounts

COMPOSE = DEPLOY / "compose.yaml"


@pytest.fixture(scope="module")
def compose_schema() -> dict[str, Any]:
    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    schema: dict[str, Any] = json.loads((vendor / "compose-spec.json").read_text())
    return schema


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = load_yaml(COMPOSE)
    return loaded


def test_compose_file_matches_the_compose_spec(
    compose: dict[str, Any], compose_schema: dict[str, Any]
) -> None:
    jsonschema.validate(compose, compose_schema)


def test_the_schema_check_rejects_a_broken_file(
    compose: dict[str, Any], compose_schema: dict[str, Any]
) -> None:
    broken = json.loads(json.dumps(compose))
    broken["services"]["guard"]["healthcheck"] = {"test": ["CMD", "true"], "intervall": "5s"}
    with pytest.raises(jsonschema.ValidationError, match="intervall"):
        jsonschema.validate(broken, compose_schema)


def test_guard_prometheus_and_grafana_are_wired_together(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"guard", "prometheus", "grafana"}
    guard = services["guard"]
    assert (DEPLOY / guard["build"]["context"] / guard["build"]["dockerfile"]).is_file()
    # Prometheus scrapes the guard service on the port the image serves on.
    scrape = load_yaml(PROMETHEUS_DIR / "prometheus.yml")["scrape_configs"][0]
    assert scrape["static_configs"][0]["targets"] == ["guard:8000"]
    assert "8000:8000" in guard["ports"]
    # Grafana's datasource is the prometheus service.
    (source,) = load_yaml(GRAFANA_DIR / "provisioning/datasources/prometheus.yaml")["datasources"]
    assert source["url"] == "http://prometheus:9090"


def test_every_bind_mount_exists_where_the_container_expects_it(compose: dict[str, Any]) -> None:
    volumes = set(compose["volumes"])
    for name, service in compose["services"].items():
        for source in volume_mounts(service):
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in volumes, f"{name}: volume {source} is not declared"
    prometheus = volume_mounts(compose["services"]["prometheus"])
    config_dir = "/etc/prometheus"
    assert prometheus["./prometheus/prometheus.yml"] == f"{config_dir}/prometheus.yml"
    for rule_file in load_yaml(PROMETHEUS_DIR / "prometheus.yml")["rule_files"]:
        assert prometheus[f"./prometheus/{rule_file}"] == f"{config_dir}/{rule_file}"


def test_guard_settings_in_compose_are_real_settings(compose: dict[str, Any]) -> None:
    from guard.settings import GuardSettings

    known = {f"GUARD_{name.upper()}" for name in GuardSettings.model_fields}
    assert set(compose["services"]["guard"]["environment"]) <= known
