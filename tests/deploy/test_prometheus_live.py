"""A real Prometheus (the Debian binary, on loopback) scrapes a running guard with the
committed scrape config and rules; the test reads hguard_ series back through its HTTP API."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.helpers import (
    DASHBOARD,
    PROMETHEUS_DIR,
    dashboard_exprs,
    exported_families,
    load_yaml,
    metric_names,
    rule_exprs,
    run,
    tool,
    unknown_metric_names,
)
from tests.deploy.live import SERVED_NAME, tiny_app
from tests.fixtures.servers import free_port, serve_in_thread, wait_until_ok

pytestmark = pytest.mark.timeout(300)
REQUESTS = 6


def scrape_config(tmp_path: Path, guard_port: int) -> Path:
    """The committed prometheus.yml and rules.yml, retargeted at the test guard, 1 s cadence."""
    config = load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "hguard"]
    job.update(scrape_interval="1s", scrape_timeout="1s")
    job["static_configs"][0]["targets"] = [f"127.0.0.1:{guard_port}"]
    config["scrape_configs"] = [job]
    rules = load_yaml(PROMETHEUS_DIR / "rules.yml")
    for group in rules["groups"]:
        group["interval"] = "1s"
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    run([tool("promtool"), "check", "config", str(path)])
    return path


class PrometheusAPI:
    def __init__(self, base: str) -> None:
        self.base = base

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.base}/api/v1/query", params={"query": expr}, timeout=5)
        response.raise_for_status()
        result: list[dict[str, Any]] = response.json()["data"]["result"]
        return result

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, expr: str, at_least: float, timeout_s: float = 60) -> float:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = self.value(expr)
            if value is not None and value >= at_least:
                return value
            time.sleep(0.5)
        raise AssertionError(f"{expr} did not reach {at_least} in {timeout_s} s (last {value})")

    def get(self, path: str) -> Any:
        response = httpx.get(f"{self.base}{path}", timeout=5)
        response.raise_for_status()
        return response.json()["data"]


@contextmanager
def prometheus(tmp: Path, guard: str) -> Iterator[PrometheusAPI]:
    """The Debian Prometheus scraping ``guard``, on a free loopback port; always stopped."""
    port = free_port()
    config = scrape_config(tmp, int(guard.rsplit(":", 1)[1]))
    with (tmp / "prometheus.log").open("w") as log:
        process = subprocess.Popen(
            [tool("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            wait_until_ok(f"http://127.0.0.1:{port}/-/ready", timeout_s=60)
            yield PrometheusAPI(f"http://127.0.0.1:{port}")
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, PrometheusAPI]]:
    """(guard base URL, Prometheus API) with the guard scraped every second."""
    tmp = tmp_path_factory.mktemp("prometheus")
    with serve_in_thread(tiny_app(tmp / "probe")) as guard, prometheus(tmp, guard) as prom:
        yield guard, prom


def exposed_sum(guard: str, sample: str, labels: dict[str, str]) -> float:
    """Sum of a sample's values in the guard's own /metrics, over series matching labels."""
    text = httpx.get(f"{guard}/metrics", timeout=5).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == sample and labels.items() <= s.labels.items()
    )


def send_requests(guard: str) -> None:
    with httpx.Client(base_url=guard, timeout=60) as client:
        for i in range(REQUESTS):
            body = {
                "model": SERVED_NAME,
                "max_tokens": 8,
                "temperature": 0,
                "messages": [{"role": "user", "content": f"Question number {i}?"}],
            }
            if i % 2:
                with client.stream(
                    "POST", "/v1/chat/completions", json={**body, "stream": True}
                ) as response:
                    assert response.status_code == 200
                    assert [ln for ln in response.iter_lines() if ln][-1] == "data: [DONE]"
            else:
                assert client.post("/v1/chat/completions", json=body).status_code == 200


def test_prometheus_scrapes_the_guard_and_returns_its_series(
    stack: tuple[str, PrometheusAPI],
) -> None:
    guard, prom = stack
    route = 'job="hguard", route="/v1/chat/completions"'
    before = {  # exact counts straight from the guard, so test order does not matter
        expr: exposed_sum(guard, name, labels)
        for expr, name, labels in (
            (f"sum(hguard_requests_total{{{route}}})", "hguard_requests_total",
             {"route": "/v1/chat/completions"}),
            ('sum(hguard_decisions_total{job="hguard"})', "hguard_decisions_total", {}),
            ('sum(hguard_answer_risk_count{job="hguard"})', "hguard_answer_risk_count", {}),
        )
    }  # fmt: skip
    send_requests(guard)
    for expr, count in before.items():
        assert prom.wait_for(expr, count + REQUESTS) == count + REQUESTS, expr
    assert prom.value('up{job="hguard"}') == 1
    assert (prom.value('sum(hguard_generated_tokens_total{job="hguard"})') or 0) >= REQUESTS
    (info,) = prom.query('hguard_build_info{job="hguard"}')
    assert info["metric"]["model"] == SERVED_NAME
    assert info["metric"]["probe"] == "tiny-probe" and info["metric"]["guarded"] == "true"
    quantiles = {
        r["metric"]["quantile"]: float(r["value"][1])
        for r in prom.query('hguard_probe_validation_risk_quantile{job="hguard"}')
    }
    assert quantiles == {"0.5": 0.4, "0.9": 0.8}  # from the probe manifest
    median = prom.value(
        'histogram_quantile(0.5, sum by (le) (hguard_answer_risk_bucket{job="hguard"}))'
    )
    assert median is not None and 0.0 <= median <= 1.0


def test_every_metric_the_rules_and_dashboard_name_is_exported_and_scraped(
    stack: tuple[str, PrometheusAPI],
) -> None:
    guard, prom = stack
    send_requests(guard)
    names = metric_names(rule_exprs(load_yaml(PROMETHEUS_DIR / "rules.yml")["groups"]))
    names |= metric_names(dashboard_exprs(json.loads(DASHBOARD.read_text())))
    live = httpx.get(f"{guard}/metrics", timeout=5).text
    assert unknown_metric_names(names, exported_families(live)) == set()
    prom.wait_for('sum(hguard_requests_total{job="hguard"})', 2 * REQUESTS)
    missing = {name for name in names if not prom.query(f'{name}{{job="hguard"}}')}
    assert missing == set(), f"named in rules/dashboard but no series in Prometheus: {missing}"


def test_the_rules_evaluate_on_live_data_without_errors(stack: tuple[str, PrometheusAPI]) -> None:
    guard, prom = stack
    send_requests(guard)
    deadline = time.monotonic() + 30
    while True:
        groups = prom.get("/api/v1/rules")["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        evaluated = [r for r in rules if not r["lastEvaluation"].startswith("0001")]
        if len(evaluated) == len(rules) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert {g["name"] for g in groups} == {"hguard.recording", "hguard.alerts"}
    bad = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
    assert bad == {}
    assert len(evaluated) == len(rules)
    # the live median risk is a recorded series and the healthy target alerts nothing
    assert 0.0 <= prom.wait_for('hguard:answer_risk:p50_1h{job="hguard"}', 0.0) <= 1.0
    firing = [a["labels"]["alertname"] for a in prom.get("/api/v1/alerts")["alerts"]]
    assert "HGuardTargetDown" not in firing and "HGuardTargetMissing" not in firing


def test_a_stopped_guard_raises_the_target_down_alert(tmp_path: Path) -> None:
    guard_running = ExitStack()
    guard = guard_running.enter_context(serve_in_thread(tiny_app(tmp_path / "probe")))
    try:
        with prometheus(tmp_path, guard) as prom:
            prom.wait_for('up{job="hguard"}', 1)
            guard_running.close()  # the guard stops; Prometheus keeps scraping its port
            prom.wait_for('1 - up{job="hguard"}', 1)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                alerts = {
                    a["labels"]["alertname"]: a["state"]
                    for a in prom.get("/api/v1/alerts")["alerts"]
                }
                if "HGuardTargetDown" in alerts:
                    break
                time.sleep(0.5)
            # pending: the rule matched and waits out its `for: 2m` before paging
            assert alerts.get("HGuardTargetDown") == "pending", alerts
    finally:
        guard_running.close()
