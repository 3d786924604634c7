"""Paths, tools and PromQL helpers shared by the deploy tests."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
GRAFANA_DIR = DEPLOY / "grafana"
K8S_DIR = DEPLOY / "k8s"
DASHBOARD = GRAFANA_DIR / "dashboards" / "hguard.json"
VENV_BIN = REPO / ".venv" / "bin"

# Grafana's built-in variables, replaced by values PromQL accepts, so exprs can be parsed.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "$job": ".*",
    "$instance": ".*",
}

METRIC_NAME = re.compile(r"(?<![\w:])hguard_\w+")
SUFFIXES = {
    "_bucket": ("histogram",),
    "_sum": ("histogram", "summary"),
    "_count": ("histogram", "summary"),
    "_total": ("counter",),
}


def tool(name: str) -> str:
    """Absolute path of a command-line tool; a missing tool FAILS the test (never skips)."""
    found = shutil.which(name) or (str(VENV_BIN / name) if (VENV_BIN / name).exists() else None)
    if found is None:
        pytest.fail(
            f"{name} is not installed: run `make apt` (promtool, chromium, chromedriver) "
            "or `make install` (Python tools of the dev extra)"
        )
    return found


def run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a command; the test fails with its output when it exits non-zero."""
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_yaml_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def volume_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Short-syntax compose volumes ``source:target[:mode]`` as source -> target."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        mounts[source] = target
    return mounts


def substitute_grafana_variables(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def metric_names(exprs: Iterable[str]) -> set[str]:
    """Every ``hguard_*`` metric name an expression selects (recording rule names excluded)."""
    return {name for expr in exprs for name in METRIC_NAME.findall(expr)}


def exported_families(exposition: str) -> dict[str, str]:
    """Family name -> type from Prometheus text exposition (e.g. a live ``/metrics``)."""
    return {f.name: f.type for f in text_string_to_metric_families(exposition)}


def unknown_metric_names(names: Iterable[str], families: dict[str, str]) -> set[str]:
    """Names that no exported family provides: a gauge by its name, a counter by
    ``_total``, a histogram by ``_bucket``/``_sum``/``_count``."""
    unknown = set()
    for name in names:
        if families.get(name) in ("gauge", "untyped"):
            continue
        suffix = next((s for s in SUFFIXES if name.endswith(s)), None)
        if suffix and families.get(name[: -len(suffix)]) in SUFFIXES[suffix]:
            continue
        unknown.add(name)
    return unknown


def rule_exprs(groups: list[dict[str, Any]]) -> Iterator[str]:
    for group in groups:
        for rule in group["rules"]:
            yield rule["expr"]


def dashboard_exprs(dashboard: dict[str, Any]) -> Iterator[str]:
    """Every PromQL expression of the dashboard: panel targets and variable queries."""
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield target["expr"]
    for variable in dashboard["templating"]["list"]:
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", text)
        yield inner.group(1) if inner else text


def check_promql_with_promtool(exprs: Iterable[str], tmp_path: Path) -> None:
    """Parse expressions with promtool by wrapping each one in a recording rule."""
    rules = [
        {"record": f"check:expr_{i}", "expr": substitute_grafana_variables(expr)}
        for i, expr in enumerate(exprs)
    ]
    path = tmp_path / "exprs.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "exprs", "rules": rules}]}))
    run([tool("promtool"), "check", "rules", str(path)])
